#!/usr/bin/env bash
# Install what is needed, then run the main example: disaggregated prefill/decode in two
# processes, the KV cache streamed layer by layer over shared memory, every page verified,
# time-to-first-token with and without streaming.  (The earlier write/counter example:
# examples/write_counter.py.)
source "$(dirname "$0")/_setup.sh"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's aiofabric
exec "$PY" examples/disagg_serving.py "$@"
