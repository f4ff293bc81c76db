"""The ``aiofabric`` command: ``aiofabric info`` shows which libfabric providers
and NICs this machine offers (and which one :func:`aiofabric.open_engine`
picks); ``aiofabric version`` prints the versions.

Exit status: 0 on success, 1 when the named provider is not available, 2 for
usage errors.  :func:`main` returns the status instead of exiting.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

__all__ = ["main"]

SYSFS = Path("/sys/class")
_PCI_ADDR = re.compile(r"^[0-9a-f]{4,}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_WIDTH = 100


def _gather(provider: str | None) -> dict[str, Any]:
    """Everything ``info`` reports, as one JSON-able document."""
    from . import __version__, fabric_version
    from .nics import discover, group
    from .providers import default_provider, list_providers

    everything = list_providers()  # before libibverbs is touched: libfabric's verbs provider sets it up
    nics = discover(use_verbs=True)
    default = default_provider(everything)
    shown = list_providers(provider) if provider else everything
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in shown:
        groups.setdefault(p.provider, []).append({
            "domain": p.domain, "fabric": p.fabric, "rma": p.rma, "cq_data_size": p.cq_data_size,
            "mr_mode": list(p.mr_mode), "data_progress": p.data_progress, "threading": p.threading,
            "inject_size": p.inject_size, "max_msg_size": p.max_msg_size, "hmem": p.hmem})
    return {
        "aiofabric_version": __version__,
        "libfabric_version": fabric_version(),
        "default_provider": default,
        "default_provider_source": "AIOFABRIC_PROVIDER" if os.environ.get("AIOFABRIC_PROVIDER") else "preference",
        "default_provider_available": default is not None and any(p.provider == default for p in everything),
        "providers": groups,
        "nics": [asdict(n) for n in nics],
        "groups": [[n.name for n in g] for g in group(nics)],
    }


def _table(header: Sequence[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    """Left-aligned columns within 100 characters.  When the last column does
    not fit, it goes on wrapped lines of its own under each row."""
    cols = [list(header), *rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header) - 1)]
    lead = len(indent) + sum(w + 2 for w in widths)
    inline = max(len(r[-1]) for r in cols) <= _WIDTH - lead
    lines = []
    for i, r in enumerate(cols):
        head = indent + "".join(c.ljust(w + 2) for c, w in zip(r, widths))
        lines.append((head + (r[-1] if inline else "")).rstrip())
        if not inline and i:
            lines += textwrap.wrap(f"{header[-1].lower()}: {r[-1].replace(',', ', ')}", _WIDTH,
                                   initial_indent=indent * 2, subsequent_indent=indent * 4)
    return lines


def _dash(value: object) -> str:
    """A table cell: "-" for unknown."""
    return "-" if value is None else str(value)


def _text(doc: dict[str, Any]) -> str:
    """The human-readable form of the ``info`` document."""
    d = doc["default_provider"]
    note = "" if doc["default_provider_available"] or not d else " (NOT available here)"
    source = f"  [from {doc['default_provider_source']}]" if d else ""
    lines = [f"aiofabric {doc['aiofabric_version']}, libfabric {doc['libfabric_version']}",
             f"open_engine() default provider: {d or 'none'}{note}{source}"]
    yn = {True: "yes", False: "no"}
    for name, domains in doc["providers"].items():
        lines += ["", f"provider {name}" + ("  (default)" if name == d else "")]
        rows = [[x["domain"], x["fabric"], yn[x["rma"]], str(x["cq_data_size"]), x["data_progress"],
                 x["threading"], str(x["inject_size"]), yn[x["hmem"]], ",".join(x["mr_mode"]) or "-"]
                for x in domains]
        lines += _table(["DOMAIN", "FABRIC", "RMA", "IMM(B)", "PROGRESS", "THREADING", "INJECT(B)", "HMEM",
                         "MR_MODE"], rows)
    if "nics" in doc:
        lines += _nics_text(doc["nics"], doc.get("groups", []))
    return "\n".join(lines)


def _speed(gbps: float | None) -> str:
    return "-" if gbps is None else f"{gbps:g}"


def _nics_text(nics: list[dict[str, Any]], groups: list[list[str]]) -> list[str]:
    """The "NICs" section: every NIC and the DomainGroups an engine would form."""
    lines = ["", "NICs (see docs/nics.md)"]
    lines += _table(["NAME", "KIND", "STATE", "GB/S", "NUMA", "PCI", "NETDEVS", "ADDRESSES"],
                    [[n["name"], n["kind"] + (" (virtual)" if n["virtual"] else ""), _dash(n["state"]),
                      _speed(n["speed_gbps"]), _dash(n["numa_node"]), _dash(n["pci"]),
                      ",".join(n["netdevs"]) or "-", ",".join(n["addresses"]) or "-"] for n in nics])
    if not groups:
        return lines + ["", "proposed DomainGroups: none (no physical NIC is up)"]
    lines += ["", "proposed DomainGroups (physical NICs that are up, by NUMA node and speed, at most 4 each)"]
    return lines + [f"  group {i}: {', '.join(g)}" for i, g in enumerate(groups)]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aiofabric", description="Inspect aiofabric and libfabric on this machine.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="list libfabric providers, NICs and the default provider")
    info.add_argument("--provider", metavar="NAME", help="only providers libfabric matches to NAME (e.g. shm, tcp, 'tcp;ofi_rxm')")
    info.add_argument("--json", action="store_true", help="print one JSON document")
    sub.add_parser("version", help="print the aiofabric and libfabric versions")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "info" and args.provider is not None and not args.provider.strip():
            parser.error("--provider needs a non-empty provider name")
    except SystemExit as exc:  # argparse: usage errors (2) and --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "version":
        from . import __version__, fabric_version
        print(f"aiofabric {__version__} (libfabric {fabric_version()})")
        return 0
    doc = _gather(args.provider)
    if args.provider and not doc["providers"]:
        print(f"aiofabric: provider {args.provider!r} is not available on this machine "
              "(run `aiofabric info` to list the available ones)", file=sys.stderr)
        return 1
    try:
        print(json.dumps(doc, indent=2) if args.json else _text(doc), flush=True)
    except BrokenPipeError:  # `aiofabric info | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0
