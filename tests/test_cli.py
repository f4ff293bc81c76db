"""The ``aiofabric`` command line, in a subprocess and in-process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import aiofabric
from aiofabric import cli

LOOPBACK = {"FI_TCP_IFACE": "lo", "FI_UDP_IFACE": "lo", "FI_SOCKETS_IFACE": "lo"}
BAD_ARGS = [["info", "--bogus"], ["frobnicate"], ["info", "--provider"], ["version", "extra"],
            ["info", "--provider", ""], ["--json"]]


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in LOOPBACK.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AIOFABRIC_PROVIDER", raising=False)


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-m", "aiofabric", *args], capture_output=True, text=True,
                          env=full, timeout=60, check=False)


def call(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------- subprocess

def test_info_lists_providers() -> None:
    p = run("info")
    assert p.returncode == 0, p.stderr
    assert "provider shm" in p.stdout and "provider tcp;ofi_rxm" in p.stdout
    assert f"libfabric {aiofabric.fabric_version()}" in p.stdout
    assert f"default provider: {aiofabric.default_provider()}" in p.stdout
    assert "proposed DomainGroups" in p.stdout and "Traceback" not in p.stderr
    assert all(len(line) <= 100 for line in p.stdout.splitlines())


def test_info_json_contains_default_provider() -> None:
    p = run("info", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["default_provider"] is not None
    assert doc["default_provider"] == aiofabric.default_provider()
    assert doc["default_provider_available"] is True
    assert {"shm", "tcp;ofi_rxm"} <= set(doc["providers"])
    assert doc["libfabric_version"] == aiofabric.fabric_version()


def test_env_var_picks_default_provider() -> None:
    doc = json.loads(run("info", "--json", AIOFABRIC_PROVIDER="shm").stdout)
    assert (doc["default_provider"], doc["default_provider_source"]) == ("shm", "AIOFABRIC_PROVIDER")
    p = run("info", AIOFABRIC_PROVIDER="nosuch")
    assert p.returncode == 0 and "default provider: nosuch (NOT available here)" in p.stdout


def test_unknown_provider_exits_1() -> None:
    p = run("info", "--provider", "nosuch")
    assert p.returncode == 1
    assert "nosuch" in p.stderr and "not available" in p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""


@pytest.mark.parametrize("args", BAD_ARGS + [[]], ids=" ".join)
def test_bad_args_exit_2(args: list[str]) -> None:
    p = run(*args)
    assert p.returncode == 2
    assert "usage: aiofabric" in p.stderr and "Traceback" not in p.stderr


def test_version() -> None:
    p = run("version")
    assert p.returncode == 0
    assert p.stdout.strip() == f"aiofabric {aiofabric.__version__} (libfabric {aiofabric.fabric_version()})"


def test_console_script() -> None:
    script = Path(sys.executable).with_name("aiofabric")
    if not script.exists():
        pytest.skip("console script not installed next to this interpreter")
    p = subprocess.run([str(script), "version"], capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0 and aiofabric.__version__ in p.stdout


# ---------------------------------------------------------------- in-process

def test_main_info(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = call(capsys, "info")
    assert rc == 0 and err == ""
    assert "provider shm" in out and "provider tcp;ofi_rxm" in out
    assert "NICs (see docs/nics.md)" in out


def test_main_info_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = call(capsys, "info", "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["default_provider"] == aiofabric.default_provider()
    assert doc["aiofabric_version"] == aiofabric.__version__
    shm = doc["providers"]["shm"]
    expected = [p for p in aiofabric.list_providers() if p.provider == "shm"]
    assert [(d["domain"], d["cq_data_size"], d["rma"], d["mr_mode"], d["inject_size"]) for d in shm] == [
        (p.domain, p.cq_data_size, p.rma, list(p.mr_mode), p.inject_size) for p in expected
    ]
    assert set(shm[0]) >= {"fabric", "data_progress", "threading", "hmem", "max_msg_size"}
    assert isinstance(doc["nics"], list) and isinstance(doc["groups"], list)


def test_main_provider_filter(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOFABRIC_PROVIDER", "shm")
    rc, out, _ = call(capsys, "info", "--provider", "shm", "--json")
    doc = json.loads(out)
    assert rc == 0 and list(doc["providers"]) == ["shm"] and doc["default_provider"] == "shm"
    rc, out, _ = call(capsys, "info", "--provider", "tcp;ofi_rxm")
    assert rc == 0 and "provider tcp;ofi_rxm" in out and "provider shm" not in out


def test_main_unknown_provider(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = call(capsys, "info", "--provider", "nosuch")
    assert (rc, out) == (1, "") and "'nosuch' is not available" in err


@pytest.mark.parametrize("args", BAD_ARGS + [[]], ids=" ".join)
def test_main_bad_args(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    rc, out, err = call(capsys, *args)
    assert rc == 2 and out == "" and "usage: aiofabric" in err


def test_main_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = call(capsys, "--help")
    assert rc == 0 and "info" in out and "version" in out
    rc, out, _ = call(capsys, "version")
    assert rc == 0 and aiofabric.__version__ in out and aiofabric.fabric_version() in out


def test_text_rendering_fits_100_columns() -> None:
    """A machine with RDMA NICs and every mr_mode flag (not this one): the table wraps."""
    mr = ["LOCAL", "VIRT_ADDR", "ALLOCATED", "PROV_KEY", "MMU_NOTIFY", "RMA_EVENT", "ENDPOINT", "HMEM"]
    domain = {"domain": "mlx5_0", "fabric": "IB-0xfe80000000000000", "rma": True, "cq_data_size": 4,
              "mr_mode": mr, "data_progress": "manual", "threading": "domain", "inject_size": 64,
              "max_msg_size": 2**30, "hmem": True}
    doc = {"aiofabric_version": "0.1.0", "libfabric_version": "1.17", "default_provider": None,
           "default_provider_source": "preference", "default_provider_available": False,
           "providers": {"verbs;ofi_rxm": [domain]},
           "nics": [{"name": "mlx5_0", "kind": "rdma", "speed_gbps": 200.0, "numa_node": 0,
                     "pci": "0000:3b:00.0", "addresses": [], "state": "active", "netdevs": ["ib0"],
                     "virtual": False}],
           "groups": [["mlx5_0"]]}
    text = cli._text(doc)
    assert all(len(line) <= 100 for line in text.splitlines())
    assert "default provider: none\n" in text
    assert all(flag in text for flag in mr)
    assert "    mr_mode: LOCAL, VIRT_ADDR, " in text  # too wide for the table: on a line of its own
    assert "mlx5_0" in text and "200" in text and "group 0: mlx5_0" in text
