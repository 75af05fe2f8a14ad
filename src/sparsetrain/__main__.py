"""``python -m sparsetrain``: the same as the ``sparsetrain`` command."""

import sys

from .cli import main

sys.exit(main())
