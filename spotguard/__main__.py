"""`python -m spotguard`: the same as the `spotguard` console script."""

from spotguard.cli import main

raise SystemExit(main())
