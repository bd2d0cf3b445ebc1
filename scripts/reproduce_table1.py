#!/usr/bin/env python
"""Reproduce the paper's Table 1 (test accuracy and ECE; also records pruning for Table 2).

    python scripts/reproduce_table1.py --profile smoke            # tiny model, minutes
    python scripts/reproduce_table1.py --profile offline          # SmolLM2-135M on CPU, hours
    python scripts/reproduce_table1.py --profile paper --data-dir DATA --checkpoint-dir WEIGHTS
"""

import sys

from abmll.experiments import main

if __name__ == "__main__":
    sys.exit(main("table1"))
