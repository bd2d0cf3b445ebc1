#!/usr/bin/env python
"""Reproduce the paper's Figure 2 (validation accuracy and ECE per epoch), reusing Table 1's runs.

    python scripts/reproduce_figure2.py --profile smoke            # tiny model, minutes
    python scripts/reproduce_figure2.py --profile offline          # SmolLM2-135M on CPU, hours
    python scripts/reproduce_figure2.py --profile paper --data-dir DATA --checkpoint-dir WEIGHTS
"""

import sys

from abmll.experiments import main

if __name__ == "__main__":
    sys.exit(main("figure2"))
