"""Provider discovery: what libfabric offers on this machine, and which
provider :func:`aiofabric.open_engine` picks when none is named."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ._lib import ffi, lib

__all__ = ["ProviderInfo", "list_providers", "default_provider", "PREFERENCE", "mr_mode_names"]

#: Order in which ``open_engine(provider=None)`` tries providers: RDMA NICs
#: first, then the portable ones.  ``AIOFABRIC_PROVIDER`` overrides it.
PREFERENCE = ("efa", "verbs;ofi_rxm", "tcp;ofi_rxm", "shm", "net", "udp;ofi_rxd", "sockets")

_MR_BITS = ("LOCAL", "RAW", "VIRT_ADDR", "ALLOCATED", "PROV_KEY", "MMU_NOTIFY", "RMA_EVENT", "ENDPOINT", "HMEM")
_PROGRESS = {1: "auto", 2: "manual"}
_THREADING = {1: "safe", 2: "fid", 3: "domain", 4: "completion", 5: "endpoint"}


@dataclass(frozen=True)
class ProviderInfo:
    provider: str
    fabric: str
    domain: str
    rma: bool
    cq_data_size: int     #: bytes of immediate data a write can carry
    mr_mode: tuple[str, ...]
    data_progress: str
    threading: str
    inject_size: int
    max_msg_size: int
    hmem: bool


def mr_mode_names(bits: int) -> tuple[str, ...]:
    return tuple(n for n in _MR_BITS if bits & getattr(lib, f"FI_MR_{n}"))


def _s(p) -> str:
    return ffi.string(p).decode(errors="replace") if p != ffi.NULL else ""


def list_providers(provider: str | None = None) -> list[ProviderInfo]:
    """Every (provider, domain) pair offering reliable-datagram endpoints with
    messages and RMA writes, as libfabric reports them."""
    hints = lib.fi_allocinfo()
    if hints == ffi.NULL:
        raise MemoryError("fi_allocinfo")
    out: list[ProviderInfo] = []
    info = ffi.new("struct fi_info **")
    try:
        hints.ep_attr.type = lib.FI_EP_RDM
        hints.caps = lib.FI_MSG | lib.FI_RMA
        hints.domain_attr.mr_mode = sum(
            getattr(lib, f"FI_MR_{n}") for n in ("LOCAL", "VIRT_ADDR", "ALLOCATED", "PROV_KEY", "ENDPOINT", "HMEM")
        )
        if provider:
            hints.fabric_attr.prov_name = lib.strdup(provider.encode())
        rc = lib.fi_getinfo((1 << 16) | 9, ffi.NULL, ffi.NULL, 0, hints, info)
        if rc != 0:
            return []
        seen = set()
        p = info[0]
        while p != ffi.NULL:
            d = p.domain_attr
            pi = ProviderInfo(
                provider=_s(p.fabric_attr.prov_name),
                fabric=_s(p.fabric_attr.name),
                domain=_s(d.name),
                rma=bool(p.caps & lib.FI_RMA),
                cq_data_size=int(d.cq_data_size),
                mr_mode=mr_mode_names(d.mr_mode),
                data_progress=_PROGRESS.get(d.data_progress, str(d.data_progress)),
                threading=_THREADING.get(d.threading, str(d.threading)),
                inject_size=int(p.tx_attr.inject_size),
                max_msg_size=int(p.ep_attr.max_msg_size),
                hmem=bool(p.caps & lib.FI_HMEM),
            )
            key = (pi.provider, pi.fabric, pi.domain)
            if key not in seen:
                seen.add(key)
                out.append(pi)
            p = p.next
        lib.fi_freeinfo(info[0])
    finally:
        lib.fi_freeinfo(hints)
    return out


def default_provider(available: list[ProviderInfo] | None = None) -> str | None:
    """The provider ``open_engine()`` uses when none is named."""
    env = os.environ.get("AIOFABRIC_PROVIDER")
    if env:
        return env
    names = {p.provider for p in (available if available is not None else list_providers()) if p.cq_data_size >= 4}
    for name in PREFERENCE:
        if name in names:
            return name
    return None
