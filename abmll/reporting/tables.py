"""Tables 1-3 in the paper's layout, as Markdown, CSV and LaTeX.

Every cell is a mean ± standard error over seeds (:func:`abmll.reporting.stats.summarize`).
Bold (significance rule, per column): the best mean, and every row that a two-sided Welch
t-test over the per-seed values cannot separate from the best at ``alpha`` (p >= alpha).
When either side has fewer than two seeds the test is undefined: such a row is bold only if
its mean equals the best mean. The paper bolds "statistically significant best performances,
including tied ones"; it does not name the test.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .results import (
    ABMLL_METHODS,
    ResultSet,
    default_abmll_beta,
    RunResult,
    log10_beta,
    method_label,
    method_sort_key,
    split_label,
)
from .stats import Summary, summarize, welch_t_test

__all__ = [
    "Cell",
    "Block",
    "Table",
    "mark_best",
    "table1",
    "table2",
    "table3",
    "DEFAULT_ALPHA",
    "PAPER_PRUNE_FRACTIONS",
]

DEFAULT_ALPHA = 0.05
PAPER_PRUNE_FRACTIONS = (0.0, 0.01, 0.1, 0.2, 0.3)
HIGHER_IS_BETTER = {"accuracy": True, "ece": False, "nll": False, "brier": False}
ARROWS = {True: "↑", False: "↓"}
LATEX_ARROWS = {True: r"$\uparrow$", False: r"$\downarrow$"}


@dataclass
class Cell:
    summary: Optional[Summary]
    metric: str
    seeds: Tuple[int, ...] = ()
    bold: bool = False
    is_best: bool = False
    p_value: Optional[float] = None  # Welch, two-sided, against the column's best

    def text(self, max_n: int) -> str:
        """``75.2% ± 0.3%`` (accuracy) or ``0.262 ± 0.001`` (other metrics); ``—`` if missing."""
        s = self.summary
        if s is None:
            return "—"
        if self.metric == "accuracy":
            body = f"{100 * s.mean:.1f}% ± {100 * s.se:.1f}%"
        else:
            body = f"{s.mean:.3f} ± {s.se:.3f}"
        if s.n < max_n:
            body += f" (n={s.n})"
        return body


@dataclass
class Block:
    """One grid: rows x columns of cells (e.g. Table 1's accuracy half, or Table 2's NLI part)."""

    title: str
    row_header: str
    rows: List[Tuple[str, str]]  # (key, label)
    columns: List[Tuple[str, str, str]]  # (key, label, metric)
    cells: Dict[Tuple[str, str], Cell] = field(default_factory=dict)

    def cell(self, row: str, col: str) -> Cell:
        metric = next(m for k, _, m in self.columns if k == col)
        return self.cells.get((row, col), Cell(None, metric))

    def max_n(self) -> int:
        return max((c.summary.n for c in self.cells.values() if c.summary is not None), default=0)


@dataclass
class Table:
    name: str  # table1 | table2 | table3
    title: str
    notes: List[str]
    blocks: List[Block]

    # ---------------------------------------------------------------- Markdown
    def to_markdown(self) -> str:
        out = [f"## {self.title}", ""]
        for note in self.notes:
            out.append(note)
        if self.notes:
            out.append("")
        for block in self.blocks:
            max_n = block.max_n()
            if block.title:
                out += [f"**{block.title}**", ""]
            out.append("| " + " | ".join([block.row_header] + [lbl for _, lbl, _ in block.columns]) + " |")
            out.append("|" + "---|" + "".join("---:|" for _ in block.columns))
            for rkey, rlabel in block.rows:
                texts = []
                for ckey, _, _ in block.columns:
                    c = block.cell(rkey, ckey)
                    t = c.text(max_n)
                    texts.append(f"**{t}**" if c.bold else t)
                out.append("| " + " | ".join([rlabel] + texts) + " |")
            out.append("")
        return "\n".join(out)

    # ---------------------------------------------------------------- LaTeX
    def to_latex(self) -> str:
        def esc(s: str) -> str:
            return (
                s.replace("\\", r"\textbackslash{}")
                .replace("%", r"\%")
                .replace("_", r"\_")
                .replace("&", r"\&")
                .replace("#", r"\#")
                .replace("±", r"$\pm$")
                .replace("↑", r"$\uparrow$")
                .replace("↓", r"$\downarrow$")
                .replace("—", "--")
                .replace("β", r"$\beta$")
            )

        out = [f"% {self.title}", "% " + " ".join(self.notes).replace("\n", " ").replace("**", "")]
        for block in self.blocks:
            max_n = block.max_n()
            out.append(r"\begin{tabular}{l" + "c" * len(block.columns) + "}")
            out.append(r"\toprule")
            if block.title:
                out.append(r"\multicolumn{%d}{l}{%s} \\" % (len(block.columns) + 1, esc(block.title)))
                out.append(r"\midrule")
            out.append(" & ".join([esc(block.row_header)] + [esc(lbl) for _, lbl, _ in block.columns]) + r" \\")
            out.append(r"\midrule")
            for rkey, rlabel in block.rows:
                texts = []
                for ckey, _, _ in block.columns:
                    c = block.cell(rkey, ckey)
                    t = esc(c.text(max_n))
                    texts.append(r"\textbf{%s}" % t if c.bold else t)
                out.append(" & ".join([esc(rlabel)] + texts) + r" \\")
            out.append(r"\bottomrule")
            out.append(r"\end{tabular}")
            out.append("")
        return "\n".join(out)

    # ---------------------------------------------------------------- CSV (long format)
    CSV_FIELDS = [
        "table", "block", "row", "column", "metric", "mean", "se", "std", "n",
        "bold", "is_best", "p_vs_best", "seeds", "values",
    ]

    def csv_rows(self) -> List[Dict[str, object]]:
        rows = []
        for block in self.blocks:
            for rkey, _ in block.rows:
                for ckey, _, metric in block.columns:
                    c = block.cell(rkey, ckey)
                    s = c.summary
                    rows.append({
                        "table": self.name,
                        "block": block.title,
                        "row": rkey,
                        "column": ckey,
                        "metric": metric,
                        "mean": "" if s is None else repr(s.mean),
                        "se": "" if s is None else repr(s.se),
                        "std": "" if s is None else repr(s.std),
                        "n": 0 if s is None else s.n,
                        "bold": int(c.bold),
                        "is_best": int(c.is_best),
                        "p_vs_best": "" if c.p_value is None else repr(c.p_value),
                        "seeds": ";".join(str(x) for x in c.seeds),
                        "values": "" if s is None else ";".join(repr(v) for v in s.values),
                    })
        return rows

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.csv_rows())
        return buf.getvalue()

    def is_empty(self) -> bool:
        return not any(c.summary is not None for b in self.blocks for c in b.cells.values())


def mark_best(cells: Dict[str, Cell], higher_is_better: bool, alpha: float = DEFAULT_ALPHA) -> None:
    """Bold, in place, the best cell(s) of one column and those a Welch test cannot separate."""
    present = {k: c for k, c in cells.items() if c.summary is not None}
    if not present:
        return
    sign = 1.0 if higher_is_better else -1.0
    best_mean = max(sign * c.summary.mean for c in present.values())
    best_keys = [k for k, c in present.items() if sign * c.summary.mean == best_mean]
    # The reference is the best row with the most seeds (ties on the mean are all best).
    ref = max(best_keys, key=lambda k: present[k].summary.n)
    ref_values = present[ref].summary.values
    for k, c in present.items():
        if k in best_keys:
            c.is_best = c.bold = True
            c.p_value = None if k == ref else 1.0
            continue
        res = welch_t_test(c.summary.values, ref_values)
        if res is None:
            c.p_value = None
            c.bold = False  # untestable (n < 2): bold only if tied, handled above
        else:
            c.p_value = res.p_value
            c.bold = res.p_value >= alpha


def _cell(runs: Sequence[RunResult], metric: str, getter: Callable[[RunResult], Dict[str, float]]) -> Cell:
    vals, seeds = [], []
    for r in runs:
        try:
            v = getter(r)[metric]
        except (KeyError, TypeError):
            continue
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        vals.append(float(v))
        seeds.append(r.seed)
    return Cell(summarize(vals), metric, tuple(seeds))


def _bold_columns(block: Block, alpha: float) -> None:
    for ckey, _, metric in block.columns:
        column = {rkey: block.cells[(rkey, ckey)] for rkey, _ in block.rows if (rkey, ckey) in block.cells}
        mark_best(column, HIGHER_IS_BETTER.get(metric, True), alpha)


def _significance_note(alpha: float) -> str:
    return (
        f"Mean ± standard error over seeds (SE = sample std with ddof=1 / √n; n=1 is shown with SE 0, "
        f"which is undefined, and marked (n=1)). **Bold**: the best mean in each column, and every row "
        f"that a two-sided Welch t-test over the per-seed values cannot separate from it (p ≥ {alpha:g}); "
        f"rows with fewer than 2 seeds are bold only when tied with the best. "
        f"(n=k) marks a cell with fewer seeds than the table's largest."
    )


def abmll_runs(results: ResultSet, split: str, abmll_beta: Optional[float] = None,
               method: str = "ABMLL") -> Tuple[List[RunResult], Optional[str]]:
    """The runs of an ABMLL method (one with a beta) that a table or figure uses for a split:
    those with ``abmll_beta`` (default: the learner's default beta), or the only beta there is."""
    if abmll_beta is None:
        abmll_beta = default_abmll_beta()
    label = method_label(method)
    runs = results.select(split=split, method=method, beta=abmll_beta)
    if runs:
        return runs, None
    betas = results.betas(split, method)
    if len(betas) == 1:
        return results.select(split=split, method=method, beta=betas[0]), (
            f"{split_label(split)}: no {label} runs with beta={abmll_beta:g}; used the only beta found, {betas[0]:g}"
        )
    return [], (
        f"{split_label(split)}: no {label} runs with beta={abmll_beta:g} (found {', '.join(f'{b:g}' for b in betas)})"
        if betas else None
    )


def _method_runs(results: ResultSet, split: str, method: str, abmll_beta: Optional[float],
                 notes: List[str]) -> List[RunResult]:
    if method in ABMLL_METHODS:
        runs, note = abmll_runs(results, split, abmll_beta, method)
        if note and note not in notes:
            notes.append(note)
        return runs
    return results.select(split=split, method=method)


def _seed_note(results: ResultSet, splits: Sequence[str]) -> str:
    seeds = sorted({r.seed for r in results.runs if r.split in splits})
    return f"Seeds found: {', '.join(map(str, seeds)) or 'none'}."


def table1(
    results: ResultSet,
    splits: Optional[Sequence[str]] = None,
    methods: Optional[Sequence[str]] = None,
    *,
    alpha: float = DEFAULT_ALPHA,
    abmll_beta: Optional[float] = None,
    test_average: str = "mean",
) -> Table:
    """Test accuracy and ECE at each run's best validation epoch: methods x splits."""
    splits = list(splits) if splits is not None else results.splits()
    methods = list(methods) if methods is not None else results.methods()
    methods = sorted(methods, key=method_sort_key)
    extra: List[str] = []
    blocks = []
    for metric, name in (("accuracy", "Acc"), ("ece", "ECE")):
        up = HIGHER_IS_BETTER[metric]
        block = Block(
            title="",
            row_header="Method",
            rows=[(m, method_label(m)) for m in methods],
            columns=[(s, f"{split_label(s)} {name} {ARROWS[up]}", metric) for s in splits],
        )
        for s in splits:
            for m in methods:
                runs = _method_runs(results, s, m, abmll_beta, extra)
                if runs:
                    block.cells[(m, s)] = _cell(runs, metric, lambda r: r.test_metrics(test_average))
        _bold_columns(block, alpha)
        blocks.append(block)
    avg = "mean over test tasks" if test_average == "mean" else "pooled over all test examples"
    notes = [
        "Table 1: test accuracy and ECE (" + avg + ") at each run's best validation-accuracy epoch.",
        _significance_note(alpha),
        _seed_note(results, splits),
    ] + extra
    return Table("table1", "Table 1: test accuracy and ECE across seeds", notes, blocks)


def table2(
    results: ResultSet,
    splits: Optional[Sequence[str]] = None,
    methods: Optional[Sequence[str]] = None,
    *,
    fractions: Sequence[float] = PAPER_PRUNE_FRACTIONS,
    metrics: Sequence[str] = ("accuracy", "ece"),
    alpha: float = DEFAULT_ALPHA,
    abmll_beta: Optional[float] = None,
) -> Table:
    """Test metrics with 0/1/10/20/30% of hidden units pruned: per split, methods x fractions."""
    splits = list(splits) if splits is not None else results.splits()
    methods = sorted(methods if methods is not None else results.methods(), key=method_sort_key)
    extra: List[str] = []
    blocks = []
    letters = "abcdefghijklmnopqrstuvwxyz"
    i = 0
    for metric in metrics:
        for s in splits:
            block = Block(
                title=f"({letters[i % 26]}) {split_label(s)}, {'accuracy' if metric == 'accuracy' else metric.upper()}",
                row_header="Method",
                rows=[(m, method_label(m)) for m in methods],
                columns=[(f"{f:g}", f"{100 * f:g}% Pruned", metric) for f in fractions],
            )
            i += 1
            for m in methods:
                runs = _method_runs(results, s, m, abmll_beta, extra)
                for f in fractions:
                    usable = [r for r in runs if f in r.pruning]
                    if usable:
                        block.cells[(m, f"{f:g}")] = _cell(usable, metric, lambda r, f=f: r.pruning[f])
            _bold_columns(block, alpha)
            blocks.append(block)
    notes = [
        "Table 2: test metrics of each run's best-validation adapters with a fraction of hidden units "
        "zeroed in every transformer layer's output, per token, smallest |activation| first "
        "(abmll/evaluation/pruning.py); test-time adaptation also runs on the pruned model. "
        "0% is the unpruned test result of Table 1.",
        _significance_note(alpha),
        _seed_note(results, splits),
    ] + extra
    return Table("table2", "Table 2: robustness to pruning", notes, blocks)


def _fmt_log10(lb: float) -> str:
    if math.isinf(lb):
        return "-inf (β=0)"
    return f"{lb:g}"


def table3(
    results: ResultSet,
    splits: Optional[Sequence[str]] = None,
    *,
    alpha: float = DEFAULT_ALPHA,
    min_betas: int = 2,
) -> Table:
    """ABMLL's beta sweep: per split, rows log10 beta, validation accuracy and ECE at the best epoch.

    Without ``splits``: every split with at least ``min_betas`` distinct ABMLL betas.
    """
    if splits is None:
        splits = [s for s in results.splits() if len(results.betas(s)) >= min_betas]
    blocks = []
    for s in splits:
        betas = results.betas(s)
        block = Block(
            title=f"{split_label(s)}" if len(splits) > 1 else "",
            row_header="log10 β",
            rows=[(repr(log10_beta(b)), _fmt_log10(log10_beta(b))) for b in betas],
            columns=[("accuracy", "Accuracy ↑", "accuracy"), ("ece", "ECE ↓", "ece")],
        )
        for b in betas:
            runs = results.select(split=s, method="ABMLL", beta=b)
            for metric in ("accuracy", "ece"):
                block.cells[(repr(log10_beta(b)), metric)] = _cell(runs, metric, lambda r: r.val_at_best)
        _bold_columns(block, alpha)
        blocks.append(block)
    where = ", ".join(split_label(s) for s in splits) or "no split with several betas"
    notes = [
        f"Table 3: ABMLL validation accuracy and ECE at the best validation epoch across β ({where}).",
        _significance_note(alpha),
        _seed_note(results, splits),
    ]
    return Table("table3", "Table 3: validation accuracy and ECE across β", notes, blocks)
