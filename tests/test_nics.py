"""NIC discovery (aiofabric.nics) on a fake sysfs tree and on this machine, and
the NICs section of ``aiofabric info``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from aiofabric import cli, nics
from aiofabric.nics import Nic

ADDRS = {"eth0": ("10.0.0.1", "10.0.0.11"), "eth1": ("10.0.1.1",), "ib0": ("10.1.0.1",), "lo": ("127.0.0.1",),
         "veth0": ("10.0.0.1",), "ghost": ("10.9.9.9",)}


def _write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text + "\n")


def _pci(root: Path, bdf: str, numa: str | None) -> Path:
    dev = root / "devices" / f"pci{bdf[:7]}" / bdf
    dev.mkdir(parents=True)
    if numa is not None:
        _write(dev / "numa_node", numa)
    return dev


def _net(root: Path, name: str, device: Path | None, **files: str | bytes) -> Path:
    entry = root / "class" / "net" / name
    entry.mkdir(parents=True)
    for key, value in files.items():
        _write(entry / key, value)
    if device is not None:
        (entry / "device").symlink_to(device)
    return entry


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    """Two 25G NICs on NUMA 1, a 100G NIC on NUMA 0, a 400G InfiniBand device
    (mlx5_0, net interface ib0) on NUMA 0, a second RDMA device that is down,
    a veth, lo, and a NIC whose files are garbage or unreadable."""
    pci_3b = _pci(tmp_path, "0000:3b:00.0", "1")
    pci_3c = _pci(tmp_path, "0000:3c:00.0", "1")
    pci_af = _pci(tmp_path, "0000:af:00.0", "0")
    pci_5e = _pci(tmp_path, "0000:5e:00.0", "0")
    pci_86 = _pci(tmp_path, "0000:86:00.0", "-1")
    virtio = pci_af / "virtio3"  # a virtio NIC: the link points one level below the PCI function
    virtio.mkdir()
    _net(tmp_path, "eth1", pci_3c, operstate="up", speed="25000")
    _net(tmp_path, "eth0", pci_3b, operstate="up", speed="25000")
    _net(tmp_path, "eth2", virtio, operstate="up", speed="100000")
    _net(tmp_path, "ib0", pci_5e, operstate="up", speed="400000")
    _net(tmp_path, "lo", None, operstate="unknown")
    _net(tmp_path, "veth0", None, operstate="up", speed="10000")
    _net(tmp_path, "eth3", tmp_path / "devices" / "platform" / "dummy0", operstate="down",
               speed="fast", numa_node="x")
    (tmp_path / "devices" / "platform" / "dummy0").mkdir(parents=True)
    _write(tmp_path / "devices" / "platform" / "dummy0" / "numa_node", "zero")
    _net(tmp_path, "eth4", None, operstate=b"\xff\xfe", speed="-1")
    (tmp_path / "class" / "net" / "eth4" / "speed").unlink()
    (tmp_path / "class" / "net" / "eth4" / "speed").mkdir()  # reading it fails (IsADirectoryError)
    (tmp_path / "class" / "net" / "eth4" / "device").symlink_to("device")  # a symlink loop
    ib = tmp_path / "class" / "infiniband"
    _write(ib / "mlx5_0" / "ports" / "1" / "rate", "400 Gb/sec (4X NDR)")
    _write(ib / "mlx5_0" / "ports" / "1" / "state", "4: ACTIVE")
    (ib / "mlx5_0" / "device").symlink_to(pci_5e)
    (pci_5e / "net" / "ib0").mkdir(parents=True)
    _write(ib / "mlx5_1" / "ports" / "1" / "rate", "garbage")
    _write(ib / "mlx5_1" / "ports" / "1" / "state", "1: DOWN")
    _write(ib / "mlx5_1" / "ports" / "2" / "rate", "2.5 Gb/sec (1X SDR)")
    (ib / "mlx5_1" / "device").symlink_to(pci_86)
    return tmp_path


def nic(name: str, kind: str = "net", speed: float | None = 25.0, numa: int | None = 0, pci: str | None = "",
        state: str = "up", virtual: bool = False, addresses: tuple[str, ...] = ()) -> Nic:
    return Nic(name=name, kind=kind, speed_gbps=speed, numa_node=numa, pci=f"0000:{name}" if pci == "" else pci,
               addresses=addresses, state=state, netdevs=(), virtual=virtual)


def names(groups: list[list[Nic]]) -> list[list[str]]:
    return [[n.name for n in g] for g in groups]


# ------------------------------------------------------------------ discover

def test_discover_fake_sysfs(sysfs: Path) -> None:
    found = nics.discover(str(sysfs), addresses=ADDRS)
    assert found == [
        Nic("mlx5_0", "rdma", 400.0, 0, "0000:5e:00.0", ("10.1.0.1",), "active", ("ib0",), False),
        Nic("mlx5_1", "rdma", 2.5, None, "0000:86:00.0", (), "down", (), False),
        Nic("eth0", "net", 25.0, 1, "0000:3b:00.0", ("10.0.0.1", "10.0.0.11"), "up", (), False),
        Nic("eth1", "net", 25.0, 1, "0000:3c:00.0", ("10.0.1.1",), "up", (), False),
        Nic("eth2", "net", 100.0, 0, "0000:af:00.0", (), "up", (), False),
        Nic("eth3", "net", None, None, None, (), "down", (), False),
        Nic("eth4", "net", None, None, None, (), None, (), True),
        Nic("ib0", "net", 400.0, 0, "0000:5e:00.0", ("10.1.0.1",), "up", (), False),
        Nic("lo", "net", None, None, None, ("127.0.0.1",), "unknown", (), True),
        Nic("veth0", "net", 10.0, None, None, ("10.0.0.1",), "up", (), True),
    ]


def test_discover_missing_root(tmp_path: Path) -> None:
    assert nics.discover(tmp_path / "nothing", addresses={}) == []
    (tmp_path / "class" / "net").mkdir(parents=True)
    assert nics.discover(tmp_path, addresses={}) == []


@pytest.mark.parametrize(("text", "gbps"), [("25000", 25.0), ("100", 0.1), ("-1", None), ("0", None),
                                             ("4294967295", None), ("fast", None), ("", None), (None, None)])
def test_net_speed(text: str | None, gbps: float | None) -> None:
    assert nics._net_speed(text) == gbps


@pytest.mark.parametrize(("text", "gbps"), [("400 Gb/sec (4X NDR)", 400.0), ("2.5 Gb/sec (1X SDR)", 2.5),
                                             ("56 Gb/sec (4X FDR)", 56.0), ("0 Gb/sec", None),
                                             ("garbage", None), ("", None), (None, None)])
def test_rdma_rate(text: str | None, gbps: float | None) -> None:
    assert nics._rdma_rate(text) == gbps


def test_libibverbs_devices_are_added(monkeypatch: pytest.MonkeyPatch, sysfs: Path) -> None:
    monkeypatch.setattr(nics, "verbs_devices", lambda: ["zz_fake0"])
    fake = [n for n in nics.discover(addresses={}, use_verbs=True) if n.name == "zz_fake0"]
    assert fake == [Nic("zz_fake0", "rdma", None, None, None, (), None, (), False)]
    assert "zz_fake0" not in {n.name for n in nics.discover(addresses={})}  # opt-in
    assert "zz_fake0" not in {n.name for n in nics.discover(sysfs, addresses={}, use_verbs=True)}  # real /sys only


def test_libibverbs_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nics.ctypes.util, "find_library", lambda name: None)
    assert nics.verbs_devices() is None
    assert any(n.name == "lo" for n in nics.discover(use_verbs=True)) or not Path("/sys/class/net/lo").exists()


# ------------------------------------------------------------------ addresses

def test_ipv4_addresses_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    full = nics.ipv4_addresses()
    assert all(isinstance(a, str) and a.count(".") == 3 for v in full.values() for a in v)
    primary = nics._siocgifaddr()
    assert set(primary) == set(full)
    assert all(primary[k][0] in full[k] for k in primary)
    monkeypatch.setattr(nics, "_getifaddrs", lambda: None)
    assert nics.ipv4_addresses() == {k: tuple(v) for k, v in primary.items()}

    def broken() -> None:
        raise OSError("no")
    monkeypatch.setattr(nics, "_getifaddrs", broken)
    assert nics.ipv4_addresses() == {}


# ------------------------------------------------------------------ group

def test_group_prefers_rdma(sysfs: Path) -> None:
    found = nics.discover(sysfs, addresses=ADDRS)
    assert names(nics.group(found)) == [["mlx5_0"]]  # mlx5_1 is down; ib0 is mlx5_0's own interface


def test_group_net_only(sysfs: Path) -> None:
    found = [n for n in nics.discover(sysfs, addresses=ADDRS) if n.kind == "net"]
    # NUMA 0: ib0 (400G) then eth2 (100G), never together; NUMA 1: the two 25G NICs by PCI address
    assert names(nics.group(found)) == [["ib0"], ["eth2"], ["eth0", "eth1"]]
    assert names(nics.group(found, per_group=1)) == [["ib0"], ["eth2"], ["eth0"], ["eth1"]]


def test_group_split_and_order() -> None:
    six = [nic(f"e{i}", pci=f"0000:0{5 - i}:00.0") for i in range(6)]
    assert names(nics.group(six)) == [["e5", "e4", "e3"], ["e2", "e1", "e0"]]  # by PCI, 3 + 3 not 4 + 2
    assert names(nics.group(six, per_group=2)) == [["e5", "e4"], ["e3", "e2"], ["e1", "e0"]]
    assert [len(g) for g in nics.group(six[:5])] == [3, 2]
    assert [len(g) for g in nics.group(six[:4])] == [4]
    mixed = [nic("nonuma", numa=None), nic("slow", speed=10.0), nic("fast", speed=100.0), nic("nospeed", speed=None),
             nic("n1", numa=1), nic("n0", numa=0)]
    assert names(nics.group(mixed)) == [["fast"], ["n0"], ["slow"], ["nospeed"], ["n1"], ["nonuma"]]


def test_group_excludes() -> None:
    assert nics.group([]) == []
    left_out = [nic("down", state="down"), nic("unknown", state="unknown"), nic("virt", virtual=True),
                nic("nopci", pci=None), nic("rdma_down", kind="rdma", state="down")]
    assert nics.group(left_out) == []
    assert names(nics.group([*left_out, nic("ok")])) == [["ok"]]


@pytest.mark.parametrize("bad", [0, 5, -1])
def test_group_bad_per_group(bad: int) -> None:
    with pytest.raises(ValueError, match="per_group must be from 1 to 4"):
        nics.group([nic("a")], per_group=bad)


@pytest.mark.parametrize("bad", [True, 2.0, "2"])
def test_group_per_group_type(bad: object) -> None:
    with pytest.raises(TypeError, match="per_group"):
        nics.group([nic("a")], per_group=bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------ resolve

def test_resolve(sysfs: Path) -> None:
    found = nics.discover(sysfs, addresses={k: v for k, v in ADDRS.items() if k != "veth0"})
    assert nics.resolve("eth1", found) == "eth1"
    assert nics.resolve("mlx5_0", found) == "mlx5_0"
    assert nics.resolve("10.0.0.1", found) == "eth0"
    assert nics.resolve("10.0.0.11", found) == "eth0"  # a secondary address
    assert nics.resolve("10.1.0.1", found) == "ib0"  # the net interface, not the RDMA device


@pytest.mark.parametrize(("spec", "why"), [
    ("eth9", "not an interface name"), ("10.9.9.9", "no interface has this IPv4 address"),
    ("192.0.2.77", "no interface has this IPv4 address"), ("", "not an interface name"),
    ("::1", "not an interface name"), ("10.0.0.1/24", "not an interface name"), ("ETH0", "not an interface name"),
])
def test_resolve_unknown(sysfs: Path, spec: str, why: str) -> None:
    found = nics.discover(sysfs, addresses={"eth0": ("10.0.0.1",)})
    with pytest.raises(ValueError) as info:
        nics.resolve(spec, found)
    msg = str(info.value)
    assert f"unknown NIC {spec!r}" in msg and why in msg
    assert "known: mlx5_0, mlx5_1, eth0 [10.0.0.1], eth1," in msg


def test_resolve_ambiguous_and_bad_type(sysfs: Path) -> None:
    found = nics.discover(sysfs, addresses=ADDRS)  # veth0 has eth0's address too
    with pytest.raises(ValueError, match=r"'10.0.0.1' is on several interfaces \(eth0, veth0\)"):
        nics.resolve("10.0.0.1", found)
    with pytest.raises(TypeError, match="not int"):
        nics.resolve(1, found)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"known: none\)"):
        nics.resolve("eth0", [])


# ------------------------------------------------------------------ this machine

@pytest.mark.skipif(not Path("/sys/class/net/lo").exists(), reason="needs Linux sysfs")
def test_real_sysfs() -> None:
    found = nics.discover()
    lo = next(n for n in found if n.name == "lo")
    assert lo.kind == "net" and lo.virtual and lo.pci is None
    assert nics.resolve("lo") == "lo"
    if "127.0.0.1" in lo.addresses:
        assert nics.resolve("127.0.0.1") == "lo"
    for g in nics.group(found):
        assert 1 <= len(g) <= 4 and all(not n.virtual and n.is_up for n in g)


# ------------------------------------------------------------------ aiofabric info

@pytest.fixture
def _loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("FI_TCP_IFACE", "FI_UDP_IFACE", "FI_SOCKETS_IFACE"):
        monkeypatch.setenv(key, "lo")
    monkeypatch.delenv("AIOFABRIC_PROVIDER", raising=False)


@pytest.mark.usefixtures("_loopback")
def test_info_json_has_nics_and_groups(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    found = nics.discover(use_verbs=True)
    assert [n["name"] for n in doc["nics"]] == [n.name for n in found]
    assert set(doc["nics"][0]) == {"name", "kind", "speed_gbps", "numa_node", "pci", "addresses", "state",
                                   "netdevs", "virtual"}
    assert doc["groups"] == names(nics.group(found))
    assert "net_devices" not in doc  # superseded by "nics"


@pytest.mark.usefixtures("_loopback")
def test_info_text_has_nics_section() -> None:
    p = subprocess.run([sys.executable, "-m", "aiofabric", "info"], capture_output=True, text=True,
                       env=dict(os.environ), timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    assert "\nNICs (see docs/nics.md)\n" in p.stdout and "proposed DomainGroups" in p.stdout
    assert all(len(line) <= 100 for line in p.stdout.splitlines())


def test_info_text_rendering(sysfs: Path) -> None:
    found = nics.discover(sysfs, addresses={**ADDRS, "ib0": tuple(f"10.1.0.{i}" for i in range(1, 12))})
    doc = {"aiofabric_version": "0.1.0", "libfabric_version": "1.17", "default_provider": None,
           "default_provider_source": "preference", "default_provider_available": False, "providers": {},
           "nics": [asdict(n) for n in found],
           "groups": names(nics.group([n for n in found if n.kind == "net"]))}
    text = cli._text(doc)
    assert all(len(line) <= 100 for line in text.splitlines())
    assert "  group 0: ib0\n  group 1: eth2\n  group 2: eth0, eth1" in text
    assert "addresses: 10.1.0.1, 10.1.0.2," in text  # too wide: wrapped under the row
    assert "net (virtual)" in text and "400" in text and "2.5" in text
    doc["groups"] = []
    assert "proposed DomainGroups: none" in cli._text(doc)
