#!/usr/bin/env python
"""Epoch time with 1 vs N processes (``tune run --nproc_per_node N``), same config and meta-batch.

    python scripts/benchmark_processes.py --configs tiny/abmll
    python scripts/benchmark_processes.py --configs smollm2_135m/abmll --max-steps 3
    python scripts/benchmark_processes.py --configs llama3_8b/abmll --nproc 1 8 --meta-batch 8 --threads 8 \\
        --set checkpointer.checkpoint_dir=... --set device=cuda

The logic is in ``abmll/benchmark/processes.py``.
"""

import sys

from abmll.benchmark.processes import main

if __name__ == "__main__":
    sys.exit(main())
