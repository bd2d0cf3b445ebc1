#!/usr/bin/env python
"""Peak training memory of ABMLL vs Regular LoRA on the same model and batch.

    python scripts/benchmark_memory.py --config-pair tiny
    python scripts/benchmark_memory.py --config-pair smollm2_135m
    python scripts/benchmark_memory.py --config-pair llama3_8b --device cuda   # the paper's setting
"""

import sys

from abmll.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
