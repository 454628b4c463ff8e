"""``python -m gna``: the ``gna`` command."""

import sys

from .cli import main

sys.exit(main())
