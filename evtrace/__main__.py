"""``python -m evtrace``: the command line."""

from evtrace.cli import main

raise SystemExit(main())
