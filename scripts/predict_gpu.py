#!/usr/bin/env python
"""Predicted GPU memory and time of the 7-8B configs (Llama3-8B, Qwen2-7B), on a CPU.

    python scripts/predict_gpu.py --out results/gpu_prediction
    python scripts/predict_gpu.py --families llama3_8b --activation-checkpointing on --mfu 0.3

How: abmll.benchmark.predict (fake tensors, MemTracker, FlopCounterMode); docs/gpu.md.
"""

import sys

from abmll.benchmark.predict import main

if __name__ == "__main__":
    sys.exit(main())
