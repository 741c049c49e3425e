"""``python -m guess_optim.bench``: see :func:`guess_optim.bench.cli.main`."""

import sys

from .cli import main

sys.exit(main())
