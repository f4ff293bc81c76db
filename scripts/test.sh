#!/usr/bin/env bash
# Install what is needed, then run the test suite (GPU tests skip without a GPU).
source "$(dirname "$0")/_setup.sh"
exec "$PY" -m pytest tests -q "$@"
