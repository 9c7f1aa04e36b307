"""``python -m gradgeom demo``."""

from gradgeom.cli import main

raise SystemExit(main())
