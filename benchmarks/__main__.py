"""``python -m benchmarks``: see :mod:`benchmarks`."""

import sys

from benchmarks.cli import main

sys.exit(main())
