"""The reproduce scripts' engine: profiles, the grid of runs, and a resumable runner.

Every run is an independent ``tune run abmll_recipe --config PREFIX/METHOD key=value ...``
subprocess with its own ``output_dir``:

* Tables 1, 2 and Figure 2: ``OUT/runs/{split}/{method}/seed{n}``
* Table 3 (ABMLL beta sweep): ``OUT/runs/{split}/abmll_beta{log10 beta}/seed{n}``; the
  config's own beta (1e-8) is the Table 1 run ``OUT/runs/{split}/abmll/seed{n}``, shared.

A run whose ``results.json`` says ``"finished": true`` is skipped; every other run is started
with ``resume_from_checkpoint=True`` (the recipe continues from its checkpoint, or starts fresh),
so a stopped sweep resumes where it stopped. A failed run does not stop the sweep: its
stdout/stderr are in ``stdout.log``/``stderr.log`` in its output_dir, the tail of stderr is
copied to ``reproduce_failed.log`` there, it is listed in the summary, and the script exits 1
after writing the tables from the runs that finished.

Table 1 runs always evaluate pruning (``eval.prune_fractions=[0.01,0.1,0.2,0.3]``), so Table 2
needs no training of its own: it runs (or reuses) Table 1's grid on its splits.
"""

from __future__ import annotations

import argparse
import json
import math
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

from .results import FAILED_MARKER, canonical_method, load_results, log10_beta

__all__ = [
    "PROFILES",
    "Profile",
    "RunSpec",
    "Outcome",
    "METHOD_CONFIGS",
    "PRUNE_OVERRIDE",
    "table1_specs",
    "table3_specs",
    "run_specs",
    "build_parser",
    "main",
]

# Run directory name per method (also its alias on the command line), in the row order.
METHOD_CONFIGS = {
    "Pretrained": "pretrained",
    "PretrainedTTA": "pretrained_tta",
    "RegularLoRA": "regular_lora",
    "StructuredLoRA": "structured_lora",
    "Reptile": "reptile",
    "ABMLL": "abmll",
    "ABMLL-FO": "abmll_first_order",
}
# What the scripts run unless --methods says otherwise: the paper's Table 1 rows.
PAPER_METHODS = ("Pretrained", "RegularLoRA", "StructuredLoRA", "Reptile", "ABMLL")
# A variant is a packaged config plus overrides (``{prefix}/{config}.yaml key=value``).
METHOD_VARIANTS = {
    "PretrainedTTA": ("pretrained", ("learner.test_time_adaptation=true",)),
    "ABMLL-FO": ("abmll", ("learner.outer_gradient=first_order",)),
}
PRUNE_FRACTIONS = (0.01, 0.1, 0.2, 0.3)
PRUNE_OVERRIDE = "eval.prune_fractions=[" + ",".join(f"{f:g}" for f in PRUNE_FRACTIONS) + "]"
DEFAULT_BETAS = (0.0, -5.0, -8.0, -16.0)  # log10 beta, the paper's Table 3
FAILED_TAIL_LINES = 60


@dataclass(frozen=True)
class Profile:
    name: str
    config_prefix: str
    splits: Sequence[str]  # Table 1
    table2_splits: Sequence[str]
    table3_split: str
    figure_split: str
    seeds: Sequence[int] = (0, 1, 2)
    overrides: Sequence[str] = ()  # appended to every run (before the user's --set)
    needs_data_dir: bool = False
    needs_checkpoint_dir: bool = False
    # The tokenizer file lives with the weights (Llama3: CHECKPOINT_DIR/tokenizer.model).
    tokenizer_in_checkpoint_dir: Optional[str] = None
    jobs: int = 1
    description: str = ""


PROFILES: Dict[str, Profile] = {
    "paper": Profile(
        name="paper",
        config_prefix="llama3_8b",
        splits=("cls45", "cls23", "nli", "para", "mcqa"),
        table2_splits=("nli", "para", "cls45", "cls23"),
        table3_split="cls45",
        figure_split="cls45",
        needs_data_dir=True,
        needs_checkpoint_dir=True,
        tokenizer_in_checkpoint_dir="tokenizer.model",
        description="Llama3-8B, CrossFit/UnifiedQA splits, epochs from the llama3_8b configs (500), "
        "3 seeds; one GPU (the paper: an A100 40GB)",
    ),
    "offline": Profile(
        name="offline",
        config_prefix="smollm2_135m",
        splits=("bigbench-mc",),
        table2_splits=("bigbench-mc",),
        table3_split="bigbench-mc",
        figure_split="bigbench-mc",
        # Sized for 2 CPU cores (scripts/README.md, "Time"): the configs' 2 epochs, half the
        # configs' evaluation examples (evaluation dominates: validation every epoch, the test
        # unpruned + 4 pruning fractions). max_seq_len 512: with the configs' 256 some
        # bigbench-mc prompts (parsinlu_qa) do not fit and the run stops with an error.
        overrides=("data.max_eval_examples_per_task=20",),
        description="SmolLM2-135M on the offline BIG-bench split, CPU, a few hours",
    ),
    "smoke": Profile(
        name="smoke",
        config_prefix="tiny",
        splits=("tiny",),
        table2_splits=("tiny",),
        table3_split="tiny",
        figure_split="tiny",
        overrides=("epochs=2",),
        jobs=2,
        description="tiny random model, built-in tiny split, minutes",
    ),
}


@dataclass
class RunSpec:
    name: str  # e.g. "tiny/abmll/seed0"
    config: str  # e.g. "tiny/abmll"
    output_dir: Path
    overrides: List[str]

    def command(self, tune: Sequence[str]) -> List[str]:
        return [*tune, "run", "abmll_recipe", "--config", self.config, *self.overrides]

    @property
    def results_path(self) -> Path:
        return self.output_dir / "results.json"


@dataclass
class Outcome:
    spec: RunSpec
    status: str  # done | skipped | failed | interrupted
    seconds: float = 0.0
    returncode: Optional[int] = None
    message: str = ""


# ------------------------------------------------------------------------------ grids
def _format_log10(lb: float) -> str:
    return f"{lb:g}"


def _beta_value(lb: float) -> str:
    if math.isinf(lb) and lb < 0:
        return "0.0"
    if float(lb).is_integer():
        return f"1e{int(lb)}"
    return repr(10.0**lb)


def _common_overrides(profile: Profile, args) -> List[str]:
    out = list(profile.overrides)
    if getattr(args, "epochs", None) is not None:
        out.append(f"epochs={args.epochs}")
    if args.data_dir is not None:
        out.append(f"data.data_dir={Path(args.data_dir).expanduser().resolve()}")
    elif profile.needs_data_dir and not os.environ.get("ABMLL_METAICL_DATA"):
        out.append("data.data_dir=<DATA_DIR>")
    ckpt = Path(args.checkpoint_dir).expanduser().resolve() if args.checkpoint_dir is not None else None
    if ckpt is not None:
        out.append(f"checkpointer.checkpoint_dir={ckpt}")
    elif profile.needs_checkpoint_dir:
        out.append("checkpointer.checkpoint_dir=<CHECKPOINT_DIR>")
    if args.tokenizer_path is not None:
        out.append(f"tokenizer.path={Path(args.tokenizer_path).expanduser().resolve()}")
    elif profile.tokenizer_in_checkpoint_dir:
        where = str(ckpt) if ckpt is not None else "<CHECKPOINT_DIR>"
        out.append(f"tokenizer.path={where}/{profile.tokenizer_in_checkpoint_dir}")
    out.extend(args.set or [])
    return out


def _run_spec(profile: Profile, out: Path, split: str, method: str, seed: int, dirname: str,
              common: List[str], extra: Sequence[str] = (), prune: bool = True) -> RunSpec:
    output_dir = (out / "runs" / split / dirname / f"seed{seed}").resolve()
    config_name, variant = METHOD_VARIANTS.get(method, (METHOD_CONFIGS[method], ()))
    overrides = [
        f"output_dir={output_dir}",
        f"seed={seed}",
        f"split={split}",
        "resume_from_checkpoint=True",
        *([PRUNE_OVERRIDE] if prune else []),
        *variant,
        *extra,
        *common,
    ]
    return RunSpec(
        name=f"{split}/{dirname}/seed{seed}",
        config=f"{profile.config_prefix}/{config_name}",
        output_dir=output_dir,
        overrides=overrides,
    )


def table1_specs(profile: Profile, out: Path, splits: Sequence[str], methods: Sequence[str],
                 seeds: Sequence[int], common: List[str]) -> List[RunSpec]:
    """methods x splits x seeds, seed slowest: a sweep stopped part-way leaves whole seeds
    (every method compared on the same seeds) rather than some methods with all seeds."""
    specs = []
    for seed in seeds:
        for split in splits:
            for method in methods:
                specs.append(_run_spec(profile, out, split, method, seed, METHOD_CONFIGS[method], common))
    return specs


def config_beta(profile: Profile) -> float:
    """The beta of the profile's ABMLL config (the learner's default if it cannot be read)."""
    try:
        from omegaconf import OmegaConf

        from abmll.config_registry import resolve_config

        return float(OmegaConf.load(resolve_config(f"{profile.config_prefix}/abmll")).learner.beta)
    except Exception:
        from abmll.learners.abmll import DEFAULT_BETA

        return DEFAULT_BETA


def table3_specs(profile: Profile, out: Path, split: str, betas: Sequence[float],
                 seeds: Sequence[int], common: List[str]) -> List[RunSpec]:
    """ABMLL for each log10 beta; the config's own beta is the shared Table 1 run."""
    default_lb = log10_beta(config_beta(profile))
    user_beta = any(o.startswith("learner.beta=") for o in common)
    specs = []
    for lb in betas:
        for seed in seeds:
            if lb == default_lb and not user_beta:
                specs.append(_run_spec(profile, out, split, "ABMLL", seed, "abmll", common))
            else:
                specs.append(
                    _run_spec(profile, out, split, "ABMLL", seed, f"abmll_beta{_format_log10(lb)}",
                              common, extra=[f"learner.beta={_beta_value(lb)}"], prune=False)
                )
    return specs


# ------------------------------------------------------------------------------ runner
def tune_command() -> List[str]:
    exe = Path(sys.executable).with_name("tune")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("tune")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from torchtune._cli.tune import main; sys.argv[0]='tune'; main()"]


def is_finished(spec: RunSpec) -> bool:
    try:
        data = json.loads(spec.results_path.read_text())
        # A run whose optional end steps (pruning, export) failed is resumed: the recipe redoes them.
        return data.get("finished") is True and not data.get("errors")
    except (OSError, ValueError, AttributeError):
        return False


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
        if is_finished(spec):
            return Outcome(spec, "skipped", 0.0, None, "finished results.json exists")
        spec.output_dir.mkdir(parents=True, exist_ok=True)
        marker = spec.output_dir / FAILED_MARKER
        cmd = spec.command(self.tune)
        t0 = time.perf_counter()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(spec.output_dir / "stdout.log", "a") as out, open(spec.output_dir / "stderr.log", "a") as err:
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
        if rc == 0 and is_finished(spec):
            marker.unlink(missing_ok=True)
            return Outcome(spec, "done", seconds, rc)
        if self.stopping:
            return Outcome(spec, "interrupted", seconds, rc, "stopped; rerun to resume")
        if rc == 0:
            why = "exited 0 but wrote no finished results.json (stop_after_epoch set? corrupt results.json?)"
        else:
            why = f"exited with code {rc}"
        tail = _tail(spec.output_dir / "stderr.log", FAILED_TAIL_LINES)
        marker.write_text(
            f"{stamp} {spec.name}: {why}\ncommand: {shlex.join(cmd)}\n"
            f"--- last {len(tail)} lines of {spec.output_dir / 'stderr.log'}\n" + "\n".join(tail) + "\n"
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
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TIKTOKEN_CACHE_DIR", "")
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
        if is_finished(s):
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
        where = o.spec.output_dir / FAILED_MARKER if o.status == "failed" else o.spec.output_dir
        log(f"  {o.status.upper()}: {o.spec.name}: {o.message}  [{where}]")
    return len(bad)


# ------------------------------------------------------------------------------ CLI
def _flat_list(values, cast=str) -> Optional[list]:
    if values is None:
        return None
    out = []
    for v in values:
        for part in str(v).replace(",", " ").split():
            out.append(cast(part))
    return out


def _method_list(values) -> Optional[List[str]]:
    names = _flat_list(values)
    if names is None:
        return None
    methods = []
    for n in names:
        m = canonical_method(n)
        if m not in METHOD_CONFIGS:
            raise SystemExit(
                f"error: --methods: unknown method {n!r} (choose from {', '.join(METHOD_CONFIGS.values())})"
            )
        methods.append(m)
    return methods


def build_parser(what: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"reproduce_{what}.py", description=description)
    p.add_argument("--profile", choices=sorted(PROFILES), required=True,
                   help="; ".join(f"{k}: {v.description}" for k, v in PROFILES.items()))
    p.add_argument("--out", type=Path, default=None, help="output root (default results/<profile>)")
    p.add_argument("--seeds", nargs="+", default=None, help="seeds (default 0 1 2)")
    if what in ("table3", "figure2"):
        p.add_argument("--split", default=None, help="split (default: the profile's; paper: cls45)")
    else:
        p.add_argument("--splits", nargs="+", default=None, help="splits (default: the profile's)")
    if what != "table3":
        p.add_argument("--methods", nargs="+", default=None,
                       help="methods (default the paper's: " + " ".join(METHOD_CONFIGS[m] for m in PAPER_METHODS)
                       + "; also: " + " ".join(v for k, v in METHOD_CONFIGS.items() if k not in PAPER_METHODS) + ")")
    if what == "table3":
        p.add_argument("--betas", nargs="+", default=None,
                       help="log10 beta values (default 0 -5 -8 -16)")
    p.add_argument("--data-dir", default=None, help="task directory (data.data_dir); required for paper")
    p.add_argument("--checkpoint-dir", default=None,
                   help="model weights (checkpointer.checkpoint_dir); required for paper")
    p.add_argument("--tokenizer-path", default=None,
                   help="tokenizer file (tokenizer.path); paper default: CHECKPOINT_DIR/tokenizer.model")
    p.add_argument("--epochs", type=int, default=None, help="override the profile's epochs")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=None,
                   help="extra config override for every run (repeatable)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs in parallel (default: smoke 2, else 1); each gets cores/jobs threads")
    p.add_argument("--alpha", type=float, default=0.05, help="Welch t-test level for bold (default 0.05)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    return p


def _check_args(parser: argparse.ArgumentParser, profile: Profile, args) -> None:
    if args.dry_run:
        return
    missing = []
    if profile.needs_data_dir and args.data_dir is None and not os.environ.get("ABMLL_METAICL_DATA"):
        missing.append("--data-dir (the MetaICL-layout task directory, or set ABMLL_METAICL_DATA)")
    if profile.needs_checkpoint_dir and args.checkpoint_dir is None:
        missing.append("--checkpoint-dir (Llama3-8B-Instruct weights, e.g. from `tune download`)")
    if missing:
        parser.error(f"--profile {profile.name} needs " + " and ".join(missing))
    for flag, value in (("--data-dir", args.data_dir), ("--checkpoint-dir", args.checkpoint_dir)):
        if value is not None and not Path(value).expanduser().is_dir():
            parser.error(f"{flag} {value}: not a directory")
    for kv in args.set or []:
        if "=" not in kv:
            parser.error(f"--set {kv!r}: expected KEY=VALUE")


def main(what: str, argv: Optional[Sequence[str]] = None, log: Callable[[str], None] = print) -> int:
    """Entry point of ``scripts/reproduce_{table1,table2,table3,figure2}.py``."""
    from .aggregate import write_figure2, write_table, problems_markdown
    from .tables import table1, table2, table3

    descriptions = {
        "table1": "Table 1: test accuracy and ECE, methods x splits x seeds (also records pruning for Table 2).",
        "table2": "Table 2: accuracy under pruning; runs (or reuses) Table 1's grid on the pruning splits.",
        "table3": "Table 3: ABMLL validation accuracy and ECE across beta.",
        "figure2": "Figure 2: validation accuracy and ECE per epoch; runs (or reuses) Table 1's grid on one split.",
    }
    parser = build_parser(what, descriptions[what])
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    _check_args(parser, profile, args)
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be >= 1")
    out = Path(args.out) if args.out is not None else Path("results") / profile.name
    seeds = _flat_list(args.seeds, int) or list(profile.seeds)
    jobs = args.jobs if args.jobs is not None else profile.jobs
    common = _common_overrides(profile, args)
    if what == "table3":
        split = args.split or profile.table3_split
        betas = _flat_list(args.betas, float) or list(DEFAULT_BETAS)
        splits, methods = [split], ["ABMLL"]
        specs = table3_specs(profile, out, split, betas, seeds, common)
    else:
        methods = _method_list(args.methods) or list(PAPER_METHODS)
        if what == "figure2":
            splits = [args.split or profile.figure_split]
        elif what == "table2":
            splits = _flat_list(args.splits) or list(profile.table2_splits)
        else:
            splits = _flat_list(args.splits) or list(profile.splits)
        specs = table1_specs(profile, out, splits, methods, seeds, common)

    if args.dry_run:
        tune = tune_command()
        for s in specs:
            mark = "  # finished, would skip" if is_finished(s) else ""
            log(shlex.join(s.command(tune)) + mark)
        log(f"# {len(specs)} runs ({sum(is_finished(s) for s in specs)} finished); outputs under {out.resolve()}/runs")
        return 0

    log(f"reproduce {what} ({profile.name}): {len(specs)} runs, {jobs} at a time, under {out.resolve()}/runs")
    t0 = time.perf_counter()
    outcomes = run_specs(specs, jobs=jobs, log=log)
    n_bad = summarize_outcomes(outcomes, log)
    log(f"wall time: {time.perf_counter() - t0:.1f}s")

    dirs = [s.output_dir for s in specs if s.output_dir.exists()]
    results = load_results(dirs) if dirs else load_results([])
    beta = config_beta(profile)
    if what == "table1":
        tables = [table1(results, splits, methods, alpha=args.alpha, abmll_beta=beta)]
    elif what == "table2":
        tables = [table2(results, splits, methods, alpha=args.alpha, abmll_beta=beta)]
    elif what == "table3":
        tables = [table3(results, splits, alpha=args.alpha, min_betas=1)]
    else:
        tables = []
    for t in tables:
        if t.is_empty():
            log(f"{t.name}: no finished runs, nothing to tabulate")
            continue
        paths = write_table(t, out)
        log("")
        log(t.to_markdown())
        log("wrote " + ", ".join(str(p) for p in paths))
    if what == "figure2":
        paths, notes = write_figure2(results, out, splits, methods, abmll_beta=beta)
        for n in notes:
            log(f"note: {n}")
        log("wrote " + ", ".join(str(p) for p in paths))
    if results.problems:
        log(problems_markdown(results))
    if any(o.status == "interrupted" for o in outcomes):
        return 130
    return 1 if n_bad else 0
