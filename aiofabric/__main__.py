"""``python -m aiofabric``: the ``aiofabric`` command line."""
from .cli import main

raise SystemExit(main())
