"""``python -m aiofabric.weights.simulate``: see :mod:`aiofabric.weights.simulator`."""
from __future__ import annotations

import sys

from .simulator import main

if __name__ == "__main__":
    sys.exit(main())
