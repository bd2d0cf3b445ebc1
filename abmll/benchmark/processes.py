"""Epoch time of the recipe with 1 and with N processes (``scripts/benchmark_processes.py``).

Each row is a real ``tune run [--nproc_per_node N --standalone] abmll_recipe`` with the same
config, seed and meta-batch, so every row trains the same tasks to the same adapters; only the
number of processes differs. The time is the recipe's own training time of the epoch
(``history[-1].train.seconds`` in results.json): set-up, validation and the test are not in it. Each process gets
``--threads`` threads (default 1: N processes on N cores).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from abmll.experiments.runner import tune_command
from abmll.run_contract import RunDir

__all__ = ["time_epoch", "main"]

# Keep only what the table measures: no validation, no pruning, one test example per task.
_QUIET = ("eval.validate=false", "eval.prune_fractions=[]", "data.max_eval_examples_per_task=1")


def time_epoch(config: str, nproc: int, meta_batch: int, max_steps: Optional[int], threads: int,
               out: Path, extra: Sequence[str] = ()) -> Dict[str, float]:
    """One epoch of ``config`` on ``nproc`` processes; its train seconds and meta-steps."""
    launch = ["--nproc_per_node", str(nproc), "--standalone"] if nproc > 1 else []
    cmd = [*tune_command(), "run", *launch, "abmll_recipe", "--config", config, f"output_dir={out}", "epochs=1",
           f"learner.meta_batch_size={meta_batch}", *_QUIET, *extra]
    if max_steps is not None:
        cmd.append(f"max_steps_per_epoch={max_steps}")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    results = RunDir(out).read_results()
    return {"seconds": results["history"][-1]["train"]["seconds"]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="benchmark_processes.py", description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["tiny/abmll"], help="packaged configs or paths")
    p.add_argument("--nproc", nargs="+", type=int, default=[1, 2], help="process counts to compare")
    p.add_argument("--meta-batch", type=int, default=2, help="learner.meta_batch_size (a multiple of each nproc)")
    p.add_argument("--max-steps", type=int, default=None, help="max_steps_per_epoch (meta-steps timed)")
    p.add_argument("--threads", type=int, default=1, help="threads per process")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override")
    args = p.parse_args(argv)
    rows: List[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            base = None
            for n in args.nproc:
                out = Path(tmp) / f"{config.replace('/', '_')}_{n}"
                t = time_epoch(config, n, args.meta_batch, args.max_steps, args.threads, out, args.set)["seconds"]
                base = t if base is None else base
                rows.append(f"| {config} | {n} | {args.threads} | {t:.1f} | {base / t:.2f}x |")
                print(rows[-1], flush=True)
    steps = f"first {args.max_steps} meta-steps" if args.max_steps else "whole epoch"
    print(f"\nmeta_batch_size {args.meta_batch}, {steps}, training seconds of the epoch (results.json history)\n")
    print("| config | processes | threads each | train s | speed-up |\n|---|---|---|---|---|")
    print("\n".join(rows))
    return 0
