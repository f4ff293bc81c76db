"""Build ``aiofabric._ffi`` (cffi API mode) against the system libfabric.

libfabric's data-path calls are ``static inline`` functions, so only API mode
(compiling a C extension) can call them.  The cdef files are read in a fixed
order; the native core in ``csrc/`` is compiled into the same module.

Environment:
    AIOFABRIC_LIBFABRIC_PREFIX  install prefix of libfabric (default: system)
"""
from __future__ import annotations

import os
import pathlib
import sys

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
CDEFS = ("fi_errno.h", "fabric.h", "afcore.h")
SOURCES = ("engine.c", "worker.c", "watcher.c")

MISSING_HEADERS = """\
aiofabric: the libfabric development headers (rdma/fabric.h) were not found{where}.
Install them first:
    Debian/Ubuntu:  apt-get install libfabric-dev
    Fedora/RHEL:    dnf install libfabric-devel
or point AIOFABRIC_LIBFABRIC_PREFIX at a libfabric install prefix."""


def _prefix_dirs() -> tuple[list[str], list[str]]:
    prefix = os.environ.get("AIOFABRIC_LIBFABRIC_PREFIX")
    if not prefix:
        return [], []
    p = pathlib.Path(prefix)
    return [str(p / "include")], [str(p / "lib"), str(p / "lib64")]


def _check_headers(include_dirs: list[str]) -> None:
    candidates = [pathlib.Path(d) for d in include_dirs] + [
        pathlib.Path("/usr/include"),
        pathlib.Path("/usr/local/include"),
    ]
    if not any((d / "rdma" / "fabric.h").is_file() for d in candidates):
        where = f" under {include_dirs[0]}" if include_dirs else ""
        sys.stderr.write(MISSING_HEADERS.format(where=where) + "\n")
        raise SystemExit(1)


def make_ffi() -> FFI:
    include_dirs, library_dirs = _prefix_dirs()
    _check_headers(include_dirs)
    ffi = FFI()
    ffi.cdef("\n".join((HERE / name).read_text() for name in CDEFS))
    ffi.set_source(
        "aiofabric._ffi",
        '#include <rdma/fabric.h>\n#include <rdma/fi_errno.h>\n#include <string.h>\n'
        '#include "csrc/afcore.h"\n',
        sources=[str((ROOT / "csrc" / s).relative_to(ROOT)) for s in SOURCES],
        include_dirs=[str(ROOT), *include_dirs],
        library_dirs=library_dirs,
        runtime_library_dirs=library_dirs,
        libraries=["fabric", "pthread"],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    )
    return ffi


ffibuilder = make_ffi()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
