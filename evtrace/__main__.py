from evtrace.cli import main

raise SystemExit(main())
