#!/usr/bin/env python
"""Turn a directory tree of results.json files into Tables 1-3 and Figure 2.

    python scripts/aggregate.py RESULTS_DIR [MORE_DIRS ...] --out TABLES_DIR
"""

import sys

from abmll.reporting.aggregate import main

if __name__ == "__main__":
    sys.exit(main())
