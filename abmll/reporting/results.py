"""Find and load ``results.json`` files written by ``tune run abmll_recipe``.

:func:`load_results` walks one or more directories (recursively), loads every finished run,
and reports, instead of hiding, everything else it finds: corrupt or unfinished
``results.json`` files, runs with a checkpoint but no results yet (in progress or stopped),
runs that a reproduce script recorded as failed, and duplicate (split, method, beta, seed)
runs (the first in path order is kept), and groups of seeds whose configs differ in more
than the seed and paths (merging runs from different settings by mistake).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from abmll.run_contract import (
    ABMLL_METHODS,
    CHECKPOINT_FILE,
    FAILED_MARKER,
    METHOD_LABELS,
    METHOD_ORDER,
    RESULTS_FILE,
    RunDir,
    canonical_method,
    estimator_base,
    estimator_method,
    method_label,
    results_problem,
    with_added_defaults,
)

__all__ = [
    "METHOD_ORDER",
    "METHOD_LABELS",
    "ABMLL_METHODS",
    "PAPER_SPLITS",
    "PAPER_TABLE2_SPLITS",
    "SPLIT_ORDER",
    "SPLIT_LABELS",
    "FAILED_MARKER",
    "RunResult",
    "Problem",
    "ResultSet",
    "load_results",
    "canonical_method",
    "method_label",
    "split_label",
    "log10_beta",
    "default_abmll_beta",
]

#: The paper's splits in its Table 1 order, and the four of its Table 2, in that table's order.
PAPER_SPLITS = ("cls45", "cls23", "nli", "para", "mcqa")
PAPER_TABLE2_SPLITS = ("nli", "para", "cls45", "cls23")
# The column order of the tables: the paper's, then ours; other splits follow alphabetically.
SPLIT_ORDER = [*PAPER_SPLITS, "bigbench-mc", "tiny"]
SPLIT_LABELS = {
    "cls45": "cls-45",
    "cls23": "cls-23",
    "nli": "NLI",
    "para": "Para",
    "mcqa": "MCQA",
}

def split_label(split: str) -> str:
    return SPLIT_LABELS.get(split, split)


def method_sort_key(method: str) -> Tuple[int, str]:
    """The registry's order; a variant with the other estimator right after its method."""
    if method in METHOD_ORDER:
        return (METHOD_ORDER.index(method), "")
    base = estimator_base(method)
    return (METHOD_ORDER.index(base), method) if base in METHOD_ORDER else (len(METHOD_ORDER), method)


def split_sort_key(split: str) -> Tuple[int, str]:
    return (SPLIT_ORDER.index(split), "") if split in SPLIT_ORDER else (len(SPLIT_ORDER), split)


def default_abmll_beta() -> float:
    """The ABMLL learner's default ``learner.beta``: what a run without the key used, and what
    the tables select when no beta is given. Imported here, not at the top, because the
    reporting is otherwise pure Python and this import pulls in torch."""
    from abmll.learners.abmll import DEFAULT_BETA

    return DEFAULT_BETA


def log10_beta(beta: Optional[float]) -> Optional[float]:
    """log10 of beta, rounded to 6 decimals (so 1e-8 -> -8.0); -inf for beta = 0."""
    if beta is None:
        return None
    if beta <= 0:
        return float("-inf")
    return round(math.log10(beta), 6)


@dataclass
class RunResult:
    """One finished run: a parsed ``results.json``."""

    path: Path
    method: str
    split: str
    seed: int
    beta: Optional[float]  # ABMLL only: config learner.beta
    data: Dict[str, Any] = field(repr=False)

    @property
    def group(self) -> Tuple[str, str, Optional[float]]:
        """Runs that differ only in the seed: (split, method, beta)."""
        return (self.split, self.method, self.beta)

    @property
    def log10_beta(self) -> Optional[float]:
        return log10_beta(self.beta)

    def test_metrics(self, average: str = "mean") -> Dict[str, float]:
        return self.data["test"][average]

    @property
    def val_at_best(self) -> Dict[str, float]:
        """Validation metrics of the best epoch; empty for a run without validation
        (``eval.validate=false``, which tests the last epoch)."""
        return self.data["val_at_best"] or {}

    @property
    def pruning(self) -> Dict[float, Dict[str, float]]:
        """Pruned-test metrics by fraction, with fraction 0 = the unpruned test mean."""
        out = {0.0: self.data["test"]["mean"]}
        for key, metrics in (self.data.get("pruning") or {}).items():
            out[float(key)] = metrics
        return out

    @property
    def history(self) -> List[Dict[str, Any]]:
        return self.data.get("history") or []

    @property
    def dtype(self) -> str:
        """The compute dtype the run used: ``precision.dtype`` (``dtype: auto`` resolved on its
        machine); for results written before that was recorded, the config's ``dtype``."""
        recorded = (self.data.get("precision") or {}).get("dtype")
        return str(recorded or (self.data.get("config") or {}).get("dtype", "fp32"))

    @property
    def demonstrations(self) -> int:
        """In-context demonstrations per prompt (``data.num_demonstrations``; 0: zero-shot)."""
        block = self.data.get("data") or {}
        if "num_demonstrations" in block:
            return int(block["num_demonstrations"])
        return int(((self.data.get("config") or {}).get("data") or {}).get("num_demonstrations", 0) or 0)

    @property
    def tokens_per_test_prompt(self) -> Optional[float]:
        """Mean tokens of an evaluated test prompt; None where the run did not record it."""
        return ((self.data.get("data") or {}).get("test_prompts") or {}).get("tokens_per_evaluated_prompt")

    @property
    def train_seconds(self) -> Optional[float]:
        """Wall-clock training time over the epochs run (``history``); 0 for a run with no
        training epochs (Pretrained), None where an epoch did not record it."""
        epochs = [h for h in self.history if "train" in h]
        seconds = [h["train"].get("seconds") for h in epochs]
        return None if any(s is None for s in seconds) else float(sum(seconds))

    @property
    def test_seconds(self) -> Optional[float]:
        """Wall-clock time of the test evaluation; None for runs from before it was recorded."""
        return (self.data.get("data") or {}).get("test_seconds")

    @property
    def threads(self) -> Optional[int]:
        return (self.data.get("precision") or {}).get("threads")

    @property
    def cpu_capability(self) -> str:
        """torch's CPU capability on the run's machine (``AVX2``, ``AVX512``); "" if not recorded."""
        return str((self.data.get("precision") or {}).get("cpu_capability") or "")


@dataclass
class Problem:
    """Something found that is not a usable finished run."""

    path: Path
    kind: str  # corrupt | unfinished | in-progress | failed | duplicate | config-mismatch
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.path}: {self.message}"


@dataclass
class ResultSet:
    runs: List[RunResult]
    problems: List[Problem]

    def splits(self) -> List[str]:
        return sorted({r.split for r in self.runs}, key=split_sort_key)

    def methods(self) -> List[str]:
        return sorted({r.method for r in self.runs}, key=method_sort_key)

    def select(self, *, split=None, method=None, beta="any") -> List[RunResult]:
        out = []
        for r in self.runs:
            if split is not None and r.split != split:
                continue
            if method is not None and r.method != method:
                continue
            if beta != "any" and not _same_beta(r.beta, beta):
                continue
            out.append(r)
        return sorted(out, key=lambda r: r.seed)

    def betas(self, split: str, method: str = "ABMLL") -> List[float]:
        """Distinct betas of an ABMLL method's runs on a split, largest first."""
        found: List[float] = []
        for r in self.runs:
            if r.split == split and r.method == method and r.beta is not None:
                if not any(_same_beta(r.beta, b) for b in found):
                    found.append(r.beta)
        return sorted(found, reverse=True)


def _same_beta(a: Optional[float], b: Optional[float]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return log10_beta(a) == log10_beta(b)


def _parse(path: Path) -> Union[RunResult, Problem]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return Problem(path, "corrupt", f"cannot read JSON ({type(err).__name__}: {err})")
    why = results_problem(data)
    if why:
        unfinished = isinstance(data, dict) and data.get("finished") is not True
        return Problem(path, "unfinished" if unfinished else "corrupt", why)
    method = canonical_method(data.get("method") or data.get("learner") or "")
    beta = None
    if method in ABMLL_METHODS:
        # The training estimator is part of the method: a run with the non-default one is a
        # row of its own (results.json records the learner's name; the config says which).
        sampling = ((data.get("config") or {}).get("model") or {}).get("sampling")
        method = canonical_method(estimator_method(method, sampling))
        learner_cfg = ((data.get("config") or {}).get("learner") or {})
        if "beta" in learner_cfg:
            try:
                beta = float(learner_cfg["beta"])
            except (TypeError, ValueError):
                return Problem(path, "corrupt", f"config.learner.beta is not a number: {learner_cfg['beta']!r}")
        else:
            beta = default_abmll_beta()
    try:
        seed = int(data["seed"])
    except (TypeError, ValueError):
        return Problem(path, "corrupt", f"seed is not an integer: {data['seed']!r}")
    return RunResult(path=path, method=method, split=str(data["split"]), seed=seed, beta=beta, data=data)


# Config keys that may differ between seeds of one group without making them different runs.
_IGNORED_CONFIG_KEYS = (
    "output_dir",
    "seed",
    "resume_from_checkpoint",
    "overwrite",
    "stop_after_epoch",
    "metric_logger",
    "eval.prune_fractions",
    "data.data_dir",
    "checkpointer.checkpoint_dir",
    "checkpointer.output_dir",
    "tokenizer.path",
    "device",
    "enable_activation_checkpointing",  # changes rounding only, not the method
    "compile",  # torch.compile: rounding only (eager's random draws), not the method
    "data.eval_batch_size",  # evaluation batching, not the method
)


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _config_signature(run: RunResult) -> Dict[str, Any]:
    # A key added later counts as the value runs without it used (as on resume).
    flat = _flatten(with_added_defaults(run.data.get("config") or {}))
    sig = {
        k: v
        for k, v in flat.items()
        if not any(k == ig or k.startswith(ig + ".") for ig in _IGNORED_CONFIG_KEYS)
    }
    # dtype: auto is one config value but may be bf16 on one machine and fp32 on another:
    # seeds are compared on the dtype they ran in.
    sig["dtype"] = run.dtype
    return sig


def _discover(root: Path) -> Tuple[List[Path], List[Problem]]:
    """results.json files under ``root``, and the run directories that have none."""
    if root.is_file():
        return [root], []
    if not root.is_dir():
        return [], [Problem(root, "missing", "no such file or directory")]
    found = sorted(root.rglob(RESULTS_FILE))
    have = {p.parent for p in found}
    problems: List[Problem] = []
    for ckpt in sorted(root.rglob(CHECKPOINT_FILE)):
        run = RunDir.of_checkpoint(ckpt)
        run_dir = run.root
        if run_dir not in have and not run.failed_marker.exists():
            problems.append(Problem(run_dir, "in-progress", "checkpoint but no results.json (running, or stopped: resume it)"))
    for marker in sorted(root.rglob(FAILED_MARKER)):
        if marker.parent not in have:
            tail = marker.read_text(errors="replace").strip().splitlines()
            last = tail[-1] if tail else ""
            problems.append(Problem(marker.parent, "failed", f"the run failed; see {marker}" + (f" ({last})" if last else "")))
    return found, problems


def load_results(paths: Union[str, Path, Sequence[Union[str, Path]]]) -> ResultSet:
    """Load every finished run under ``paths`` (directories searched recursively, or files)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: List[Path] = []
    problems: List[Problem] = []
    for p in paths:
        f, probs = _discover(Path(p))
        files.extend(f)
        problems.extend(probs)
    seen_files = set()
    runs: List[RunResult] = []
    for f in files:
        key = f.resolve()
        if key in seen_files:
            continue
        seen_files.add(key)
        parsed = _parse(f)
        if isinstance(parsed, Problem):
            problems.append(parsed)
        else:
            runs.append(parsed)

    # Duplicates: the same (split, method, beta, seed) twice. Keep the first in path order.
    kept: List[RunResult] = []
    by_key: Dict[tuple, RunResult] = {}
    for r in sorted(runs, key=lambda r: str(r.path)):
        key = (r.split, r.method, log10_beta(r.beta), r.seed)
        if key in by_key:
            problems.append(
                Problem(r.path, "duplicate", f"same split/method/beta/seed as {by_key[key].path}; ignored")
            )
            continue
        by_key[key] = r
        kept.append(r)

    # One split name, one set of tasks: runs on other task lists (a data.split_file reusing the
    # name) are not pooled into the same cells. The first hash in path order is the split's.
    tasks_of: Dict[str, Tuple[str, Path]] = {}
    same_tasks: List[RunResult] = []
    for r in kept:
        sha = r.data.get("task_lists_sha256")
        if sha is None:  # results written before the hash was recorded
            same_tasks.append(r)
            continue
        first = tasks_of.setdefault(r.split, (sha, r.path))
        if sha != first[0]:
            problems.append(
                Problem(r.path, "task-mismatch",
                        f"split {r.split!r} with other tasks than {first[1]} (split_file "
                        f"{r.data.get('split_file')!r}); not pooled: give the split another name")
            )
            continue
        same_tasks.append(r)
    kept = same_tasks

    # Seeds of one group should differ only in the seed (and paths).
    groups: Dict[tuple, List[RunResult]] = defaultdict(list)
    for r in kept:
        groups[(r.split, r.method, log10_beta(r.beta))].append(r)
    for members in groups.values():
        if len(members) < 2:
            continue
        ref = _config_signature(members[0])
        for other in members[1:]:
            sig = _config_signature(other)
            diff = sorted(k for k in set(ref) | set(sig) if ref.get(k) != sig.get(k))
            if diff:
                shown = ", ".join(f"{k}: {ref.get(k)!r} vs {sig.get(k)!r}" for k in diff[:4])
                more = f" (+{len(diff) - 4} more)" if len(diff) > 4 else ""
                problems.append(
                    Problem(
                        other.path,
                        "config-mismatch",
                        f"averaged with {members[0].path} but its config differs: {shown}{more}",
                    )
                )
    return ResultSet(runs=sorted(kept, key=lambda r: (split_sort_key(r.split), method_sort_key(r.method), -(r.beta or 0), r.seed)), problems=problems)

