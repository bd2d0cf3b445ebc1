#!/usr/bin/env python
"""Reproduce the paper's Table 3 (ABMLL beta sweep: validation accuracy and ECE).

    python scripts/reproduce_table3.py --profile smoke            # tiny model, minutes
    python scripts/reproduce_table3.py --profile offline          # SmolLM2-135M on CPU, hours
    python scripts/reproduce_table3.py --profile paper --data-dir DATA --checkpoint-dir WEIGHTS
"""

import sys

from abmll.experiments import main

if __name__ == "__main__":
    sys.exit(main("table3"))
