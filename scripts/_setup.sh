# Sourced by scripts/demo.sh and scripts/test.sh: install what aiofabric needs,
# idempotently, on Debian/Ubuntu.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! dpkg -s libfabric-dev >/dev/null 2>&1 || ! command -v gcc >/dev/null 2>&1 || ! command -v tc >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libfabric-dev gcc python3-dev python3-pip iproute2 >/dev/null
fi
PY=${PYTHON:-python3}
# (Re)build unless this checkout has its own native module, newer than its C
# sources, that imports: an environment may hold another checkout's build.
SO=aiofabric/_ffi.abi3.so
if [ ! -e "$SO" ] || [ "${AIOFABRIC_REBUILD:-0}" = 1 ] || [ -n "$(find csrc cdefs -newer "$SO" | head -1)" ] \
   || ! PYTHONPATH="$PWD" "$PY" -c "import aiofabric._ffi" >/dev/null 2>&1; then
    PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install -q --disable-pip-version-check -e ".[test]"
fi
# Traffic of the demo and the tests stays on loopback.
export FI_TCP_IFACE=lo FI_UDP_IFACE=lo FI_SOCKETS_IFACE=lo
