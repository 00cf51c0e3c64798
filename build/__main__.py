"""`python -m headrace.build ...`: the same commands as `headrace build ...`."""

from headrace.build.cli import main

raise SystemExit(main())
