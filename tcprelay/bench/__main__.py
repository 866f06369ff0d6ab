"""``python -m tcprelay.bench``: see :mod:`tcprelay.bench`."""

import sys

from tcprelay.bench.cli import main

sys.exit(main())
