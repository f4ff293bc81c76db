"""``open_engine``: validate settings, open the native engine, wrap it."""
from __future__ import annotations

import asyncio
import os
import ipaddress
from dataclasses import fields
from typing import Any

from ._lib import check, ffi, lib
from .config import NATIVE_FIELDS, EngineConfig
from .engine import TransferEngine
from .errors import UnavailableError
from .liveness import remove_stale_shm_regions
from .providers import default_provider

__all__ = ["open_engine"]

MAX_RAILS = 4


def _domain_name(spec: str) -> str:
    """A NIC named by an IPv4 address is the interface that has it."""
    try:
        ipaddress.IPv4Address(spec)
    except ValueError:
        return spec
    from .nics import resolve

    return resolve(spec)


class _Opener:
    """``open_engine(...)``: use with ``async with``, or ``await`` it."""

    def __init__(self, provider: str | None, nics: list[str] | None, config: EngineConfig) -> None:
        self._args = (provider, nics, config)
        self._engine: TransferEngine | None = None

    def _open(self) -> TransferEngine:
        provider, nics, config = self._args
        return _open_now(asyncio.get_running_loop(), provider, nics, config)

    def __await__(self):
        async def go() -> TransferEngine:
            return self._open()
        return go().__await__()

    async def __aenter__(self) -> TransferEngine:
        self._engine = self._open()
        return self._engine

    async def __aexit__(self, *exc: object) -> None:
        assert self._engine is not None
        await self._engine.aclose()


_swept_pid = 0


def _sweep_shm() -> None:
    """Before this process's first shm engine: remove regions that a killed
    process with our pid left behind (its shm would refuse to start, EBUSY;
    a failed start touches the region, so this cannot wait for the error)."""
    global _swept_pid
    if _swept_pid != os.getpid():
        _swept_pid = os.getpid()
        remove_stale_shm_regions()


def open_engine(provider: str | None = None, nics: list[str] | None = None,
                config: EngineConfig | None = None, **settings: Any) -> _Opener:
    """Open a TransferEngine on ``provider`` (None: the best available, see
    :func:`aiofabric.providers.default_provider`).

    ``nics`` lists the 1–4 NICs of the engine's DomainGroup, by libfabric
    domain name (``"mlx5_0"``, ``"rdmap16s27"``; for tcp the interface name,
    ``"eth0"``) or by an IPv4 address of the interface.  A name may repeat:
    two rails on one NIC (useful for tests).  None: one NIC, the provider's
    first.  Keyword settings override fields of :class:`EngineConfig`.
    Raises UnavailableError when the provider or NIC is missing.
    """
    if config is None:
        config = EngineConfig()
    if settings:
        names = {f.name for f in fields(EngineConfig)}
        bad = set(settings) - names
        if bad:
            raise TypeError(f"unknown engine setting(s): {', '.join(sorted(bad))}")
        config = EngineConfig(**{**{f.name: getattr(config, f.name) for f in fields(config)}, **settings})
    if provider is not None and (type(provider) is not str or not provider):
        raise TypeError("provider must be a non-empty string or None")
    if nics is not None:
        if isinstance(nics, str) or not all(isinstance(n, str) for n in nics):
            raise TypeError("nics must be a list of interface or domain names")
        nics = list(nics)
        if not 1 <= len(nics) <= MAX_RAILS:
            raise ValueError(f"an engine drives 1 to {MAX_RAILS} NICs, got {len(nics)}")
        if not all(nics):
            raise ValueError("NIC names must be non-empty")
    return _Opener(provider, nics, config)


def _open_now(loop: asyncio.AbstractEventLoop, provider: str | None, nics: list[str] | None,
              config: EngineConfig) -> TransferEngine:
    if provider is None:
        provider = default_provider()
        if provider is None:
            raise UnavailableError("no libfabric provider with RMA writes and immediate data found")
    for name in ("sq_slots", "eq_slots"):
        v = getattr(config, name)
        if v <= 0 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two, got {v}")
    if not 0 < config.lock_timeout <= 3600:
        raise ValueError(f"lock_timeout must be positive and at most 3600 s, got {config.lock_timeout}")
    if not config.peer_timeout > 0:
        raise ValueError(f"peer_timeout must be positive (inf: no detection), got {config.peer_timeout}")
    for name in ("max_peers", "stripe_threshold"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)}")
    if config.msg_size < 1024:
        raise ValueError("msg_size must be at least 1024")
    cfg = ffi.new("struct afc_config *")
    lib.afc_default_config(cfg)
    keep = [ffi.new("char[]", provider.encode())]
    cfg.provider = keep[0]
    for r, name in enumerate(nics or ()):
        keep.append(ffi.new("char[]", _domain_name(name).encode()))
        cfg.domains[r] = keep[-1]
    cfg.n_domains = len(nics or ())
    for f in fields(config):
        if f.name in NATIVE_FIELDS:
            setattr(cfg, f.name, int(getattr(config, f.name)))
    cfg.lock_timeout_ms = max(1, round(config.lock_timeout * 1000))
    out = ffi.new("afc_engine **")
    err = ffi.new("char[]", 512)
    if provider == "shm":
        _sweep_shm()
    rc = lib.afc_open(cfg, out, err, 512)
    if rc:
        text = ffi.string(err).decode(errors="replace")
        if rc == -lib.FI_ENODATA:
            raise UnavailableError(f"provider {provider!r} is not available here ({text})")
        check(rc, text)
    try:
        return TransferEngine(out[0], loop, config)
    except BaseException:
        lib.afc_close(out[0])
        raise
