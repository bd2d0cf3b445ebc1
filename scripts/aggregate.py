#!/usr/bin/env python
"""Turn a directory tree of results.json files into Tables 1-3 and Figure 2.

    python scripts/aggregate.py RESULTS_DIR [MORE_DIRS ...] --out TABLES_DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

from abmll.reporting.aggregate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
