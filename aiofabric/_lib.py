"""The one importer of the compiled module.  Every libfabric / native-core
return code goes through :func:`check`, which maps it to an exception."""
from __future__ import annotations

import errno as _errno

from .errors import (
    BusyResourceError,
    ClosedResourceError,
    FabricError,
    ProviderStuckError,
    RegistrationError,
    UnavailableError,
)

try:
    from ._ffi import ffi, lib
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "aiofabric's native module is not built: run `pip install -e .` "
        "(needs libfabric headers: `apt-get install libfabric-dev`)"
    ) from exc

__all__ = ["ffi", "lib", "check", "strerror", "fabric_version"]

MEMLOCK_HINT = (
    "registering memory pins it: raise the locked-memory limit "
    "(`ulimit -l unlimited`, or `memlock` in /etc/security/limits.conf, or "
    "LimitMEMLOCK=infinity for a systemd service; in a container --ulimit memlock=-1)"
)


def strerror(err: int) -> str:
    """Text of a (positive) libfabric error number."""
    return ffi.string(lib.fi_strerror(abs(err))).decode(errors="replace")


def fabric_version() -> str:
    v = lib.fi_version()
    return f"{v >> 16}.{v & 0xFFFF}"


def check(rc: int, what: str) -> int:
    """Raise the exception for a negative return code; pass others through."""
    if rc >= 0:
        return rc
    err = -rc
    if err == lib.AFC_EWEDGED:
        raise ProviderStuckError(
            f"{what}: the engine's worker is stuck inside the provider (it has held the provider's "
            "lock for longer than lock_timeout); close the engine and open a new one"
        )
    text = f"{what}: {strerror(err)}"
    if what.startswith("register"):
        if err in (_errno.ENOMEM, _errno.EPERM, _errno.EAGAIN):
            text += "; " + MEMLOCK_HINT
        raise RegistrationError(text)
    if err == lib.FI_EAGAIN:
        raise BusyResourceError(text)
    if err == lib.FI_ESHUTDOWN:
        raise ClosedResourceError(text)
    if err in (lib.FI_ENODATA, lib.FI_ENOSYS):
        raise UnavailableError(text)
    raise FabricError(text)
