"""Run a list of :class:`~abmll.experiments.grid.RunSpec` as ``tune run`` subprocesses, resumably.

A run that is finished (:meth:`abmll.run_contract.RunDir.is_finished`) is skipped; every other
run is started with ``resume_from_checkpoint=True`` (the recipe continues from its checkpoint,
or starts fresh), so a stopped sweep resumes where it stopped. A failed run does not stop the
sweep: its stdout/stderr are in ``stdout.log``/``stderr.log`` in its output_dir, the tail of
stderr is copied to ``reproduce_failed.log`` there, and it is listed in the summary. SIGTERM or
Ctrl-C stops the running runs and keeps their checkpoints.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from .grid import RunSpec

__all__ = ["Outcome", "tune_command", "child_env", "run_specs", "summarize_outcomes"]

FAILED_TAIL_LINES = 60


@dataclass
class Outcome:
    spec: RunSpec
    status: str  # done | skipped | failed | interrupted
    seconds: float = 0.0
    returncode: Optional[int] = None
    message: str = ""


def tune_command() -> List[str]:
    exe = Path(sys.executable).with_name("tune")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("tune")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from torchtune._cli.tune import main; sys.argv[0]='tune'; main()"]


def _tail(path: Path, n: int) -> List[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


class _Runner:
    def __init__(self, tune: List[str], env: Dict[str, str], log: Callable[[str], None]):
        self.tune = tune
        self.env = env
        self.log = log
        self.lock = threading.Lock()
        self.procs: Dict[int, subprocess.Popen] = {}
        self.stopping = False

    def run_one(self, spec: RunSpec) -> Outcome:
        if spec.is_finished():
            return Outcome(spec, "skipped", 0.0, None, "finished results.json exists")
        spec.output_dir.mkdir(parents=True, exist_ok=True)
        run = spec.run_dir
        marker = run.failed_marker
        cmd = spec.command(self.tune)
        t0 = time.perf_counter()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(run.stdout, "a") as out, open(run.stderr, "a") as err:
            for f in (out, err):
                f.write(f"\n===== {stamp} {shlex.join(cmd)}\n")
                f.flush()
            with self.lock:
                if self.stopping:
                    return Outcome(spec, "interrupted", 0.0, None, "not started")
                proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=self.env, stdin=subprocess.DEVNULL)
                self.procs[proc.pid] = proc
            try:
                rc = proc.wait()
            finally:
                with self.lock:
                    self.procs.pop(proc.pid, None)
        seconds = time.perf_counter() - t0
        if rc == 0 and spec.is_finished():
            marker.unlink(missing_ok=True)
            return Outcome(spec, "done", seconds, rc)
        if self.stopping:
            return Outcome(spec, "interrupted", seconds, rc, "stopped; rerun to resume")
        if rc == 0:
            why = "exited 0 but wrote no finished results.json (stop_after_epoch set? corrupt results.json?)"
        else:
            why = f"exited with code {rc}"
        tail = _tail(run.stderr, FAILED_TAIL_LINES)
        marker.write_text(
            f"{stamp} {spec.name}: {why}\ncommand: {shlex.join(cmd)}\n"
            f"--- last {len(tail)} lines of {run.stderr}\n" + "\n".join(tail) + "\n"
        )
        errors = [l for l in tail if "error" in l.lower()]
        return Outcome(spec, "failed", seconds, rc, f"{why}: {(errors or tail or [''])[-1].strip()[:300]}")

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            procs = list(self.procs.values())
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def child_env(jobs: int) -> Dict[str, str]:
    from abmll.cache import offline_env

    env = offline_env()
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        # Parallel runs share the cores; oversubscribed torch threads slow everything down.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def _interrupt_on_sigterm() -> None:
    """SIGTERM (a scheduler's preemption, `kill`) stops the sweep like Ctrl-C: runs are stopped,
    checkpoints kept, the summary printed."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def run_specs(specs: Sequence[RunSpec], *, jobs: int = 1, log: Callable[[str], None] = print) -> List[Outcome]:
    """Run every spec (skipping finished ones), ``jobs`` at a time; one progress line per run."""
    runner = _Runner(tune_command(), child_env(jobs), log)
    _interrupt_on_sigterm()
    total = len(specs)
    outcomes: List[Outcome] = []
    counter = [0]

    def report(o: Outcome) -> None:
        counter[0] += 1
        extra = f"  ({o.message})" if o.status == "failed" else ""
        log(f"[{counter[0]}/{total}] {o.spec.name}  {o.status}  {o.seconds:.1f}s{extra}")

    # Finished runs are reported first, without starting a worker.
    todo = []
    for s in specs:
        if s.is_finished():
            o = Outcome(s, "skipped", 0.0, None, "finished results.json exists")
            outcomes.append(o)
            report(o)
        else:
            todo.append(s)
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    futures = {pool.submit(runner.run_one, s): s for s in todo}
    reported = set()
    try:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in done:
                o = fut.result()
                outcomes.append(o)
                reported.add(fut)
                report(o)
        pool.shutdown(wait=True)
    except KeyboardInterrupt:
        log("interrupted: stopping the running runs (their checkpoints are kept; rerun to resume)")
        runner.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        for fut, s in futures.items():
            if fut in reported:
                continue
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                o = fut.result()
            else:
                o = Outcome(s, "interrupted", 0.0, None, "not started")
            outcomes.append(o)
            report(o)
    order = {id(s): i for i, s in enumerate(specs)}
    return sorted(outcomes, key=lambda o: order[id(o.spec)])


def summarize_outcomes(outcomes: Sequence[Outcome], log: Callable[[str], None] = print) -> int:
    """Print the summary; return the number of runs that did not finish."""
    counts: Dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    total_s = sum(o.seconds for o in outcomes)
    log(
        f"summary: {len(outcomes)} runs: "
        + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        + f"; {total_s:.1f}s of run time"
    )
    bad = [o for o in outcomes if o.status in ("failed", "interrupted")]
    for o in bad:
        where = o.spec.run_dir.failed_marker if o.status == "failed" else o.spec.output_dir
        log(f"  {o.status.upper()}: {o.spec.name}: {o.message}  [{where}]")
    return len(bad)


