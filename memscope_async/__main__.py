"""``python -m memscope_async``: the ``memscope-async`` command."""

from .cli import main

raise SystemExit(main())
