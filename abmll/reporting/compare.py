"""Method comparison on one split: which differences are real at this number of seeds.

For a split, from the finished runs of each method (one row per method, seeds pooled):

- ``comparison_{split}.csv`` — the aggregated numbers: per method (and a "+ TS" row for the
  temperature-scaling control of Pretrained, Regular LoRA and ABMLL), n seeds, mean, standard
  error and per-seed values of test accuracy, ECE, NLL, Brier, AURC, accuracy at 80% coverage
  and mean mutual information (the figure is drawn from it);
- ``comparison_{split}.md`` — that table, plus every pair of methods with the difference of
  mean accuracy and of mean ECE and the two-sided Welch t-test p-value over seeds, and what a
  run of each row cost (in-context demonstrations, tokens per test prompt, minutes of training
  and of the test, where the runs recorded them);
- ``per_task_{split}.md`` / ``.csv`` — test accuracy and ECE per unseen task and method
  (mean ± SE over seeds), to see whether a gap comes from one task or from all;
- ``acc_vs_ece_{split}.png`` — accuracy against ECE per method with ±1 SE error bars
  (needs matplotlib: ``pip install -e ".[plot]"``).
"""

from __future__ import annotations

import csv
import io
import itertools
from pathlib import Path
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from abmll.run_contract import TEST_METRICS, estimator_base

from .results import ABMLL_METHODS, ResultSet, RunResult, method_label
from .stats import summarize, welch_t_test
from .tables import abmll_runs

__all__ = ["method_runs", "comparison_rows", "comparison_csv", "comparison_markdown", "per_task_tables", "save_acc_vs_ece_png"]

#: The comparison's columns (the CSV has every test metric; the markdown puts the three selective
#: accuracies in one column of means, see :func:`_coverage_cell`).
METRICS = TEST_METRICS
#: The coverages of the selective accuracies, in the markdown's one column.
COVERAGES = (50, 80, 90)
#: Methods that get a "+ TS" row (their test predictive with one temperature per task fitted on
#: its support examples): the calibration control a reviewer asks for first. Pretrained, Regular
#: LoRA and ABMLL, with their in-context variants and ABMLL's other estimator, so that every
#: comparison of those rows can ask whether a difference in ECE is more than a temperature.
TS_METHODS = ("Pretrained", "Pretrained-ICL", "RegularLoRA", "RegularLoRA-ICL", "ABMLL", "ABMLL-ICL", "ABMLL-L")


@dataclass(frozen=True)
class Row:
    """One row of the comparison: a method's runs, read from ``test`` or from ``test_ts``."""

    key: str
    label: str
    runs: List[RunResult]
    source: str = "test"


def comparison_rows(by_method: Dict[str, List[RunResult]]) -> List[Row]:
    """Each method, then its "+ TS" row (for :data:`TS_METHODS` whose runs recorded one)."""
    rows = []
    for m, runs in by_method.items():
        rows.append(Row(m, method_label(m), runs))
        ts_runs = [r for r in runs if r.data.get("test_ts")]
        if estimator_base(m) in TS_METHODS and ts_runs:
            rows.append(Row(f"{m}+TS", f"{method_label(m)} + TS", ts_runs, "test_ts"))
    return rows


def _ece_bins(by_method: Dict[str, List[RunResult]]) -> str:
    bins = sorted({int(((r.data.get("config") or {}).get("eval") or {}).get("ece_bins", 15))
                   for runs in by_method.values() for r in runs})
    return "/".join(map(str, bins)) or "15"


def method_runs(results: ResultSet, split: str, abmll_beta: Optional[float] = None) -> Dict[str, List[RunResult]]:
    """The runs of each method on ``split``, in row order (ABMLL variants at ``abmll_beta``)."""
    out: Dict[str, List[RunResult]] = {}
    for m in results.methods():
        runs = abmll_runs(results, split, abmll_beta, m)[0] if m in ABMLL_METHODS else results.select(split=split, method=m)
        if runs:
            out[m] = runs
    return out


def _values(runs: Sequence[RunResult], metric: str, task: Optional[str] = None, source: str = "test") -> List[float]:
    """One value per run (runs written before a metric existed are left out)."""
    blocks = [r.data.get(source) or {} for r in runs]
    if task is None:
        found = [(b.get("mean") or {}).get(metric) for b in blocks]
    else:
        found = [((b.get("per_task") or {}).get(task) or {}).get(metric) for b in blocks]
    return [v for v in found if v is not None]


def comparison_csv(by_method: Dict[str, List[RunResult]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "label", "n_seeds", "seeds"] + [f"{m}_{s}" for m in METRICS for s in ("mean", "se", "values")])
    for row_ in comparison_rows(by_method):
        row: List[object] = [row_.key, row_.label, len(row_.runs), " ".join(str(r.seed) for r in row_.runs)]
        for metric in METRICS:
            s = summarize(_values(row_.runs, metric, source=row_.source))
            row += ["", "", ""] if s is None else [f"{s.mean:.6f}", f"{s.se:.6f}", " ".join(f"{v:.6f}" for v in s.values)]
        w.writerow(row)
    return buf.getvalue()


def _pm(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    s = summarize(values)
    if s is None:
        return "—"
    se = f"{s.se * scale:.{digits}f}" if s.se_defined else "n/a"
    return f"{s.mean * scale:.{digits}f} ± {se}"


def _coverage_cell(values_of) -> str:
    """The three selective accuracies as "a / b / c" (means over seeds, in %): three ± would not
    fit one column, and the CSV keeps every SE."""
    means = [summarize(values_of(f"acc_at_{c}")) for c in COVERAGES]
    return " / ".join("—" if s is None else f"{s.mean * 100:.1f}" for s in means)


def paired_p(a_runs: Sequence[RunResult], b_runs: Sequence[RunResult], metric: str,
             a_source: str = "test", b_source: str = "test") -> Tuple[Optional[float], int]:
    """Two-sided paired t-test over the seeds both methods ran, and how many there are.

    Within a seed every method is tested on the same examples (the test split is drawn from the
    seed), so the per-seed differences remove the variation that comes from which examples
    were drawn; Welch's test over seeds, which ignores the pairing, keeps it."""
    a = {r.seed: r.data[a_source]["mean"][metric] for r in a_runs}
    b = {r.seed: r.data[b_source]["mean"][metric] for r in b_runs}
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None, len(seeds)
    diffs = [a[s] - b[s] for s in seeds]
    if all(d == diffs[0] for d in diffs):  # no spread: the test is undefined, the sign is not
        return (1.0 if diffs[0] == 0 else 0.0), len(seeds)
    from scipy.stats import ttest_rel

    return float(ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue), len(seeds)


def comparison_markdown(by_method: Dict[str, List[RunResult]], split: str, alpha: float = 0.05) -> str:
    lines = [
        f"## {split}: methods (test, unweighted mean over unseen tasks; mean ± SE over seeds)",
        "",
        f"| Method | seeds | Accuracy (%) | ECE ({_ece_bins(by_method)} bins, fraction) | NLL | Brier "
        f"| AURC | Acc. at 50 / 80 / 90% coverage (%) | MI (nats) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in comparison_rows(by_method):
        v = lambda metric: _values(row.runs, metric, source=row.source)  # noqa: E731
        lines.append(
            f"| {row.label} | {len(row.runs)} | {_pm(v('accuracy'), 100)} | {_pm(v('ece'), digits=3)} | "
            f"{_pm(v('nll'), digits=3)} | {_pm(v('brier'), digits=3)} | {_pm(v('aurc'), digits=3)} | "
            f"{_coverage_cell(v)} | {_pm(v('mi'), digits=4)} |"
        )
    lines += [
        "",
        "ECE: top-label, equal-width bins, l1, a fraction. AURC: area under the risk-coverage curve, "
        "examples ranked by the predictive's top probability (lower is better); accuracy at 50 / 80 / "
        "90% coverage: on the 50, 80, 90% most confident examples of each task, means over seeds "
        "(their SEs are in the CSV). MI: mean mutual information between the prediction and "
        "the weight samples (0 with one sample or a deterministic model). + TS: the same "
        "predictions with one temperature per task fitted by NLL on that task's support examples "
        f"after adaptation. Figures: `reliability_{split}.png`, `risk_coverage_{split}.png`, "
        f"`samples_{split}.png` (where the runs kept predictions / a curve over samples).",
        "",
        f"Pairs (A minus B). Welch: two-sided Welch t-test over seeds; paired: two-sided paired "
        f"t-test over the seeds both ran (same test examples within a seed; n = common seeds); "
        f"* marks p < {alpha:g}.",
        "",
        "| A | B | Δ accuracy (points) | Welch p | paired p (n) | Δ ECE | Welch p | paired p (n) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for a, b in itertools.combinations(by_method, 2):
        row = []
        for metric, scale, digits in (("accuracy", 100, 1), ("ece", 1, 3)):
            va, vb = _values(by_method[a], metric), _values(by_method[b], metric)
            diff = (summarize(va).mean - summarize(vb).mean) * scale
            row += [f"{diff:+.{digits}f}", *_test_cells(by_method[a], by_method[b], metric, alpha)]
        lines.append(f"| {method_label(a)} | {method_label(b)} | " + " | ".join(row) + " |")
    return "\n".join(lines + _against_temperature(by_method, alpha) + _cost(by_method)) + "\n"


def _test_cells(a_runs, b_runs, metric: str, alpha: float, a_source: str = "test",
                b_source: str = "test") -> Tuple[str, str]:
    """The two test cells of a pair, A against B: Welch's p over seeds and the paired p with its
    n, each starred below ``alpha``."""
    va, vb = _values(a_runs, metric, source=a_source), _values(b_runs, metric, source=b_source)
    t = welch_t_test(va, vb)
    welch = "n/a" if t is None else f"{t.p_value:.3f}" + ("*" if t.p_value < alpha else "")
    pp, n = paired_p(a_runs, b_runs, metric, a_source, b_source)
    return welch, ("n/a" if pp is None else f"{pp:.3f}" + ("*" if pp < alpha else "")) + f" ({n})"


#: The reference of :func:`_against_temperature`: the pretrained model with one temperature per task.
TS_REFERENCE = "Pretrained+TS"


def _against_temperature(by_method: Dict[str, List[RunResult]], alpha: float) -> List[str]:
    """Every row's ECE against Pretrained + TS's: is a method's calibration more than what one
    temperature per task, fitted on the support examples, gives the pretrained model? (Empty
    when the runs recorded no ``test_ts`` for Pretrained.)"""
    rows = comparison_rows(by_method)
    ref = next((r for r in rows if r.key == TS_REFERENCE), None)
    if ref is None:
        return []
    vr = _values(ref.runs, "ece", source=ref.source)
    out = [
        "",
        f"Against a temperature: each row's ECE minus {ref.label}'s (negative: better calibrated "
        f"than the pretrained model with one temperature per task); tests as above.",
        "",
        f"| Row | Δ ECE vs {ref.label} | Welch p | paired p (n) |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        if row is ref:
            continue
        v = _values(row.runs, "ece", source=row.source)
        welch, paired = _test_cells(row.runs, ref.runs, "ece", alpha, row.source, ref.source)
        out.append(f"| {row.label} | {summarize(v).mean - summarize(vr).mean:+.3f} | {welch} | {paired} |")
    return out


def _minutes(seconds: Sequence[Optional[float]]) -> str:
    """Mean (min-max) over the runs that recorded a time, in minutes; "—" if none did."""
    got = [x / 60 for x in seconds if x is not None]
    if not got:
        return "—"
    if not any(got):
        return "0"  # nothing trained (Pretrained)
    cell = f"{sum(got) / len(got):.1f}" + (f" ({min(got):.1f}-{max(got):.1f})" if len(got) > 1 else "")
    return cell + (f" [{len(got)} of {len(seconds)}]" if len(got) < len(seconds) else "")


def _cost(by_method: Dict[str, List[RunResult]]) -> List[str]:
    """What a run of each row cost: in-context demonstrations, tokens per test prompt, and the
    wall-clock minutes of training and of the test (empty when no run recorded its prompts)."""
    if not any(r.tokens_per_test_prompt is not None for runs in by_method.values() for r in runs):
        return []
    out = [
        "",
        "Cost per run: k in-context demonstrations; tokens of an evaluated test prompt (mean over "
        "its prompts, then over runs); wall-clock minutes of training and of the test (adaptation, "
        "prediction, + TS fit, flip forward), mean (min-max) over the runs that recorded them "
        "([n of m] where fewer did). Times are one run's on its machine (CPU, threads), beside "
        "whatever else ran there: a run's cost, not a benchmark.",
        "",
        "| Method | k | tokens per test prompt | training (min) | test (min) | CPU, threads |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for m, runs in by_method.items():
        tokens = [r.tokens_per_test_prompt for r in runs if r.tokens_per_test_prompt is not None]
        machines = sorted({f"{r.cpu_capability or '?'}, {r.threads or '?'}" for r in runs})
        out.append(
            f"| {method_label(m)} | {'/'.join(sorted({str(r.demonstrations) for r in runs}))} | "
            f"{f'{sum(tokens) / len(tokens):.0f}' if tokens else '—'} | "
            f"{_minutes([r.train_seconds for r in runs])} | {_minutes([r.test_seconds for r in runs])} | "
            f"{'; '.join(machines)} |"
        )
    return out


def per_task_tables(by_method: Dict[str, List[RunResult]], split: str) -> Tuple[str, str]:
    """(markdown, csv): accuracy and ECE per task and method, mean ± SE over seeds."""
    tasks = sorted({t for runs in by_method.values() for r in runs for t in r.data["test"]["per_task"]})
    md = [
        f"## {split}: test accuracy (%) / ECE per unseen task (mean ± SE over seeds)",
        "",
        "| Task | " + " | ".join(method_label(m) for m in by_method) + " |",
        "|---|" + "---:|" * len(by_method),
    ]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["task", "method", "n_seeds", "accuracy_mean", "accuracy_se", "ece_mean", "ece_se"])
    for task in tasks:
        cells = []
        for m, runs in by_method.items():
            acc, ece = _values(runs, "accuracy", task), _values(runs, "ece", task)
            cells.append(f"{_pm(acc, 100)} / {_pm(ece, digits=2)}" if acc else "—")
            if acc:
                sa, se_ = summarize(acc), summarize(ece)
                w.writerow([task, m, sa.n, f"{sa.mean:.6f}", f"{sa.se:.6f}", f"{se_.mean:.6f}", f"{se_.se:.6f}"])
        md.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n", buf.getvalue()


def save_acc_vs_ece_png(csv_text: str, path: Path, title: str = "") -> Optional[str]:
    """Accuracy (x) against ECE (y) per method with ±1 SE bars, from ``comparison_csv``'s text.

    Returns a note instead of writing when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"{path.name} not drawn: matplotlib is not installed (pip install -e '.[plot]')"
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    fig, ax = plt.subplots(figsize=(6.0, 4.5))
    for i, r in enumerate(rows):
        x, y = 100 * float(r["accuracy_mean"]), float(r["ece_mean"])
        ax.errorbar(
            x, y, xerr=100 * float(r["accuracy_se"]), yerr=float(r["ece_se"]),
            fmt="o", capsize=4, color=f"C{i}", label=f"{r['label']} (n={r['n_seeds']})",
        )
    ax.set_xlabel("test accuracy (%) ↑")
    ax.set_ylabel("test ECE ↓")
    ax.set_title(title or "accuracy vs calibration on unseen tasks (mean ± SE over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return None
