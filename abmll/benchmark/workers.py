"""Run each measurement in a fresh subprocess (``python -m abmll.benchmark``) and read back its
result, so that no method sees another's allocations or warm caches.

The parent side (``call_worker``, ``run_worker``) starts the worker with offline Hugging Face
settings and, optionally, a thread count; the worker side (``run_call``, and the ``--worker``
branch of :func:`abmll.benchmark.cli.main`) prints one ``MARK`` line of JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, Dict, List, Optional

MARK = "MEMORY_RESULT "
#: The module a worker process runs (its ``__main__`` is :func:`abmll.benchmark.cli.main`).
WORKER_MODULE = "abmll.benchmark"
#: The functions of :mod:`abmll.benchmark.measure` a ``--call`` worker may run.
_CALLABLE = ("measure", "time_pair", "time_layer")


def _worker_env(threads: Optional[int] = None) -> Dict[str, str]:
    from abmll.cache import offline_env

    env = offline_env()
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def _run(cmd: List[str], env: Dict[str, str], failure: str) -> Dict[str, Any]:
    """Run a worker; return the JSON of its ``MARK`` line, or raise ``RuntimeError(failure ...)``."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    raise RuntimeError(f"{failure} failed (exit {proc.returncode}):\n{tail}")


def call_worker(fn: str, kwargs: Dict[str, Any], threads: Optional[int] = None, what: str = "") -> Dict[str, Any]:
    """Run ``fn(**kwargs)`` (a function of :mod:`abmll.benchmark.measure`) in a fresh process; return its result."""
    payload = json.dumps({"fn": fn, "kwargs": kwargs, "threads": threads})
    cmd = [sys.executable, "-m", WORKER_MODULE, "--call", payload]
    return _run(cmd, _worker_env(threads), f"worker {fn} {what}")


def run_call(payload: str) -> int:
    spec = json.loads(payload)
    if spec["fn"] not in _CALLABLE:
        raise ValueError(f"unknown worker function {spec['fn']!r}")
    if spec.get("threads"):
        import torch

        torch.set_num_threads(int(spec["threads"]))
    from abmll.benchmark import measure

    res = getattr(measure, spec["fn"])(**spec["kwargs"])
    print(MARK + json.dumps(res), flush=True)
    return 0


def run_worker(config: str, args) -> Dict[str, Any]:
    """``measure`` of one config in a fresh process, from ``scripts/benchmark_memory.py``'s ``args``."""
    cmd = [sys.executable, "-m", WORKER_MODULE, "--worker", config,
           "--episodes", str(args.episodes)]
    if args.seq_len:
        cmd += ["--seq-len", str(args.seq_len)]
    if args.load_weights:
        cmd.append("--load-weights")
    if args.device:
        cmd += ["--device", args.device]
    if args.sampling:
        cmd += ["--sampling", args.sampling]
    for kv in args.set or []:
        cmd += ["--set", kv]
    return _run(cmd, _worker_env(), f"memory worker for {config}")
