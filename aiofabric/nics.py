"""NIC discovery: which network interfaces and RDMA devices this machine has,
how an engine would group them into DomainGroups, and how a name or an IPv4
address given in ``open_engine(nics=[...])`` maps to an interface.

Everything comes from sysfs (``/sys/class/net`` and ``/sys/class/infiniband``),
plus the kernel's address list for IPv4 addresses and, when it is installed,
``libibverbs`` for RDMA devices sysfs does not show.  Every read is defensive:
a missing or garbled file gives ``None``, never an exception.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import os
import re
import socket
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MAX_PER_GROUP", "Nic", "discover", "group", "ipv4_addresses", "resolve", "verbs_devices"]

#: The most NICs one DomainGroup (one engine) drives.
MAX_PER_GROUP = 4

_PCI_ADDR = re.compile(r"^[0-9a-f]{4,}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*Gb/sec")
_UP = frozenset({"up", "active"})
_SIOCGIFADDR = 0x8915


@dataclass(frozen=True)
class Nic:
    """One network interface (``kind="net"``) or RDMA device (``kind="rdma"``)."""

    name: str
    kind: str                      #: "net" or "rdma"
    speed_gbps: float | None       #: link speed in Gbit/s; None when the system does not say
    numa_node: int | None          #: None when unknown (or a single-node machine that reports -1)
    pci: str | None                #: PCI address such as "0000:3b:00.0"
    addresses: tuple[str, ...]     #: IPv4 addresses (for rdma: those of its net interfaces)
    state: str | None              #: net: operstate ("up", "down", ...); rdma: port state ("active", ...)
    netdevs: tuple[str, ...]       #: rdma: the net interfaces of the device; net: ()
    virtual: bool                  #: no ``device`` link in sysfs (lo, veth, bridges, ...)

    @property
    def is_up(self) -> bool:
        return self.state in _UP


# ------------------------------------------------------------------ sysfs reads

def _read(path: Path) -> str | None:
    """Stripped contents of a sysfs file, or None if it cannot be read."""
    try:
        return path.read_text().strip()
    except (OSError, ValueError):  # missing, EINVAL (speed of a virtual link), not UTF-8, ...
        return None


def _int(text: str | None) -> int | None:
    """A sysfs number; None when absent, garbled or negative (the kernel's "unknown")."""
    try:
        value = int(text) if text is not None else -1
    except ValueError:
        return None
    return value if value >= 0 else None


def _list(path: Path) -> list[Path]:
    """Sorted entries of a directory; [] when it cannot be listed."""
    try:
        return sorted(path.iterdir())
    except OSError:
        return []


def _location(dev: Path) -> tuple[int | None, str | None]:
    """(NUMA node, PCI address) of the ``device`` link of a sysfs entry.

    The PCI address is the nearest ancestor of the resolved link that looks
    like a PCI function (a virtio NIC's link points one level below it)."""
    try:
        if not dev.exists():
            return None, None
        real = dev.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        return None, None
    pci = next((p for p in [real, *real.parents] if _PCI_ADDR.match(p.name)), None)
    numa = _int(_read(dev / "numa_node"))
    if numa is None and pci is not None:
        numa = _int(_read(pci / "numa_node"))
    return numa, pci.name if pci is not None else None


def _has_device(entry: Path) -> bool:
    try:
        return (entry / "device").exists()
    except OSError:
        return False


def _net_speed(text: str | None) -> float | None:
    """``/sys/class/net/X/speed`` (Mb/s) in Gbit/s; None for unknown (-1, 0, garbage)."""
    mbps = _int(text)
    if mbps is None or mbps == 0 or mbps == 0xFFFFFFFF:
        return None
    return mbps / 1000


def _rdma_rate(text: str | None) -> float | None:
    """``ports/N/rate`` such as "400 Gb/sec (4X NDR)" in Gbit/s; None when unparsable."""
    m = _RATE.match(text or "")
    return float(m.group(1)) if m and float(m.group(1)) > 0 else None


def _port_state(text: str | None) -> str | None:
    """"4: ACTIVE" -> "active"."""
    if not text:
        return None
    return text.split(":", 1)[-1].strip().lower() or None


# ------------------------------------------------------------------ addresses

def _getifaddrs() -> dict[str, list[str]] | None:
    """IPv4 addresses per interface from libc ``getifaddrs`` (all of them,
    secondary ones included); None when that is not possible here."""
    if not sys.platform.startswith("linux"):
        return None

    class _IfAddrs(ctypes.Structure):
        pass

    _IfAddrs._fields_ = [("next", ctypes.POINTER(_IfAddrs)), ("name", ctypes.c_char_p),
                         ("flags", ctypes.c_uint), ("addr", ctypes.c_void_p), ("netmask", ctypes.c_void_p),
                         ("ifu", ctypes.c_void_p), ("data", ctypes.c_void_p)]
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.getifaddrs.argtypes = [ctypes.POINTER(ctypes.POINTER(_IfAddrs))]
        libc.getifaddrs.restype = ctypes.c_int
        libc.freeifaddrs.argtypes = [ctypes.POINTER(_IfAddrs)]
        head = ctypes.POINTER(_IfAddrs)()
        if libc.getifaddrs(ctypes.byref(head)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    out: dict[str, list[str]] = {}
    try:
        node = head
        while node:
            entry = node.contents
            if entry.addr and entry.name:
                # struct sockaddr_in: u16 family, u16 port, 4 bytes address (Linux layout)
                raw = ctypes.string_at(entry.addr, 8)
                if struct.unpack("=H", raw[:2])[0] == socket.AF_INET:
                    name = entry.name.decode(errors="replace").split(":", 1)[0]  # "eth0:1" label -> eth0
                    addr = socket.inet_ntoa(raw[4:8])
                    if addr not in out.setdefault(name, []):
                        out[name].append(addr)
            node = entry.next
    finally:
        libc.freeifaddrs(head)
    return out


def _siocgifaddr() -> dict[str, list[str]]:
    """Fallback: the primary IPv4 address of each interface via ``SIOCGIFADDR``."""
    try:
        import fcntl
        names = [name for _, name in socket.if_nameindex()]
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    except (ImportError, OSError):
        return {}
    out: dict[str, list[str]] = {}
    with sock:
        for name in names:
            try:
                req = struct.pack("256s", name.encode()[:15])
                res = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, req)
            except OSError:  # EADDRNOTAVAIL: no IPv4 address
                continue
            out[name] = [socket.inet_ntoa(res[20:24])]
    return out


def ipv4_addresses() -> dict[str, tuple[str, ...]]:
    """IPv4 addresses of every interface of this machine, by interface name;
    interfaces without one are left out.  Never raises."""
    try:
        found = _getifaddrs()
        if found is None:
            found = _siocgifaddr()
    except Exception:  # noqa: BLE001 - discovery must never take the caller down
        return {}
    return {k: tuple(v) for k, v in found.items()}


# ------------------------------------------------------------------ libibverbs

def verbs_devices() -> list[str] | None:
    """RDMA device names ``libibverbs`` lists, or None when it is not installed."""
    path = ctypes.util.find_library("ibverbs")
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)
        lib.ibv_get_device_list.argtypes = [ctypes.POINTER(ctypes.c_int)]
        lib.ibv_get_device_list.restype = ctypes.POINTER(ctypes.c_void_p)
        lib.ibv_get_device_name.argtypes = [ctypes.c_void_p]
        lib.ibv_get_device_name.restype = ctypes.c_char_p
        lib.ibv_free_device_list.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        count = ctypes.c_int(0)
        devices = lib.ibv_get_device_list(ctypes.byref(count))
    except (OSError, AttributeError):
        return None
    if not devices:
        return []
    try:
        names = [lib.ibv_get_device_name(devices[i]) for i in range(count.value)]
    finally:
        lib.ibv_free_device_list(devices)
    return [n.decode(errors="replace") for n in names if n]


# ------------------------------------------------------------------ discovery

def _net(entry: Path, addresses: Mapping[str, Sequence[str]]) -> Nic:
    numa, pci = _location(entry / "device")
    return Nic(name=entry.name, kind="net", speed_gbps=_net_speed(_read(entry / "speed")), numa_node=numa,
               pci=pci, addresses=tuple(addresses.get(entry.name, ())), state=_read(entry / "operstate"),
               netdevs=(), virtual=not _has_device(entry))


def _rdma(entry: Path, addresses: Mapping[str, Sequence[str]]) -> Nic:
    numa, pci = _location(entry / "device")
    ports = _list(entry / "ports")
    rates = [r for r in (_rdma_rate(_read(p / "rate")) for p in ports) if r is not None]
    states = [s for s in (_port_state(_read(p / "state")) for p in ports) if s is not None]
    netdevs = tuple(p.name for p in _list(entry / "device" / "net"))
    return Nic(name=entry.name, kind="rdma", speed_gbps=max(rates) if rates else None, numa_node=numa, pci=pci,
               addresses=tuple(a for n in netdevs for a in addresses.get(n, ())),
               state="active" if "active" in states else (states[0] if states else None),
               netdevs=netdevs, virtual=not _has_device(entry))


def discover(sysfs_root: str | os.PathLike[str] = "/sys", *,
             addresses: Mapping[str, Sequence[str]] | None = None, use_verbs: bool = False) -> list[Nic]:
    """Every RDMA device (``<root>/class/infiniband``) and network interface
    (``<root>/class/net``) of this machine, RDMA devices first, each sorted by
    name.  ``addresses`` (interface name -> IPv4 addresses) defaults to this
    machine's, from :func:`ipv4_addresses`.  With ``use_verbs`` and the real
    ``/sys``, RDMA devices that only ``libibverbs`` lists are added with what
    is known about them (their name); it is off by default so that merely
    discovering NICs does not load libibverbs into the process.  Never
    raises: what cannot be read is None."""
    root = Path(sysfs_root) / "class"
    addrs = ipv4_addresses() if addresses is None else addresses
    rdma = [_rdma(e, addrs) for e in _list(root / "infiniband")]
    if use_verbs and os.fspath(sysfs_root) == "/sys":
        known = {n.name for n in rdma}
        rdma += [Nic(name=n, kind="rdma", speed_gbps=None, numa_node=None, pci=None, addresses=(), state=None,
                     netdevs=(), virtual=False)
                 for n in sorted(set(verbs_devices() or ()) - known)]
    return rdma + [_net(e, addrs) for e in _list(root / "net")]


# ------------------------------------------------------------------ grouping

def _split(nics: list[Nic], size: int) -> list[list[Nic]]:
    """``nics`` in consecutive groups of at most ``size``, as even as possible (6 by 4 -> 3 + 3)."""
    count = -(-len(nics) // size)
    base, extra = divmod(len(nics), count)
    out, start = [], 0
    for i in range(count):
        end = start + base + (i < extra)
        out.append(nics[start:end])
        start = end
    return out


def group(nics: Sequence[Nic], per_group: int | None = None) -> list[list[Nic]]:
    """How an engine would group ``nics`` into DomainGroups of 1 to 4 NICs.

    1. Only physical NICs that are up qualify: a PCI address, not virtual, and
       state "up" (net) or "active" (rdma).
    2. If any RDMA device qualifies, only RDMA devices are used (they are
       preferred over their own net interfaces); otherwise the physical net
       interfaces are.
    3. NICs are split by NUMA node (ascending, unknown last), then by link
       speed (fastest first, unknown last), so a group never mixes NUMA nodes
       or speeds; each part is sorted by PCI address.
    4. Each part is cut into consecutive groups of at most ``per_group``
       (default and maximum 4), as even as possible: 6 NICs give 3 + 3.

    Returns [] when no NIC qualifies.
    """
    if per_group is None:
        per_group = MAX_PER_GROUP
    if isinstance(per_group, bool) or not isinstance(per_group, int):
        raise TypeError(f"per_group must be an int from 1 to {MAX_PER_GROUP}, not {per_group!r}")
    if not 1 <= per_group <= MAX_PER_GROUP:
        raise ValueError(f"per_group must be from 1 to {MAX_PER_GROUP}, not {per_group}")
    usable = [n for n in nics if n.pci is not None and not n.virtual and n.is_up]
    rdma = [n for n in usable if n.kind == "rdma"]
    chosen = rdma or [n for n in usable if n.kind == "net"]
    parts: dict[tuple[int | None, float | None], list[Nic]] = {}
    for nic in chosen:
        parts.setdefault((nic.numa_node, nic.speed_gbps), []).append(nic)

    def order(key: tuple[int | None, float | None]) -> tuple[bool, int, bool, float]:
        numa, speed = key
        return (numa is None, numa or 0, speed is None, -(speed or 0.0))

    out: list[list[Nic]] = []
    for key in sorted(parts, key=order):
        out += _split(sorted(parts[key], key=lambda n: (n.pci or "", n.name)), per_group)
    return out


# ------------------------------------------------------------------ resolving

def resolve(spec: str, nics: Sequence[Nic] | None = None) -> str:
    """The interface name for ``spec``: a NIC name (returned as it is) or an
    IPv4 address of one of this machine's net interfaces.  ``nics`` defaults
    to :func:`discover`.  Raises ValueError naming ``spec`` and the known
    interfaces when nothing matches, or when an address is on several."""
    if not isinstance(spec, str):
        raise TypeError(f"a NIC is a name or an IPv4 address string, not {type(spec).__name__}")
    known = list(discover()) if nics is None else list(nics)
    if any(n.name == spec for n in known):
        return spec
    try:
        addr = str(ipaddress.IPv4Address(spec))
    except ValueError:
        addr = None
    if addr is not None:
        owners = [n.name for n in known if n.kind == "net" and addr in n.addresses]
        if len(owners) == 1:
            return owners[0]
        if owners:
            raise ValueError(f"NIC address {spec!r} is on several interfaces ({', '.join(owners)}); "
                             "pass the interface name instead")
    listing = ", ".join(n.name + (f" [{' '.join(n.addresses)}]" if n.addresses else "") for n in known) or "none"
    what = ("no interface has this IPv4 address" if addr is not None
            else "not an interface name or an IPv4 address")
    raise ValueError(f"unknown NIC {spec!r}: {what} (known: {listing})")
