"""``python -m abmll.benchmark``: the entry point of the worker processes (and of the memory benchmark)."""

import sys

from abmll.benchmark.cli import main

sys.exit(main())
