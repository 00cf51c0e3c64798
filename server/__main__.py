"""`python -m headrace.server` is the `headrace` command."""

import sys

from headrace.server.cli import main

sys.exit(main())
