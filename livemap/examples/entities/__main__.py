"""``python -m livemap.examples.entities``: see :mod:`livemap.examples.entities.cli`."""

import sys

from livemap.examples.entities.cli import main

sys.exit(main())
