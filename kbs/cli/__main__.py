"""``python -m kbs.cli``: the same as ``keylease-kbs``."""

from kbs.cli import main

raise SystemExit(main())
