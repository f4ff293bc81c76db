#!/usr/bin/env bash
# Install what is needed, then run the main example: two processes, one-sided
# writes with immediates counted at the target, on shared memory.
source "$(dirname "$0")/_setup.sh"
exec "$PY" examples/write_counter.py "$@"
