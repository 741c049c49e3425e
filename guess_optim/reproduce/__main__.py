"""``python -m guess_optim.reproduce <experiment> [--flags]``."""

from .runner import main

raise SystemExit(main())
