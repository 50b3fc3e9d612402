"""``python -m bench.cli``: the ``loram-bench`` command."""

from bench.cli import main

raise SystemExit(main())
