#!/usr/bin/env python
"""Time and memory of ABMLL against Regular LoRA on the same model and batches (issue #10).

    python scripts/benchmark.py --config-pair tiny --seq-len 64
    OMP_NUM_THREADS=1 python scripts/benchmark.py --config-pair smollm2_135m --seq-len 256 --threads 1
    python scripts/benchmark.py --config-pair llama3_8b --device cuda            # bf16, the paper's setting

Episode time (ABMLL and Regular LoRA built side by side in one process, alternating rounds after
a warm-up), training tokens/s, saved-for-backward bytes, peak memory (each method in its own
process: RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA), and one adapted layer
(default Llama3-8B's q_proj, 4096x4096) forward+backward against torchtune's LoRALinear.
Random weights unless ``--load-weights``. The shared logic is in ``abmll/benchmark/``.
"""

import sys

from abmll.benchmark.cli import benchmark_main

if __name__ == "__main__":
    sys.exit(benchmark_main())
