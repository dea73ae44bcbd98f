"""``python -m lars``: the same as the ``lars`` command."""

import sys

from lars.cli import main

sys.exit(main())
