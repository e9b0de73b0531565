"""``python -m reeldrop``: the same as the ``reeldrop`` command."""

import sys

from .cli import main

sys.exit(main())
