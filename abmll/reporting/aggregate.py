"""``python scripts/aggregate.py RESULTS_DIR [RESULTS_DIR ...] --out TABLES_DIR``

Turns a directory tree of ``results.json`` files (or several, e.g. from several machines)
into every table: Table 1, Table 2, Table 3, Figure 2 (CSV, PNG if matplotlib is installed),
a per-run listing ``runs.csv`` and ``tables.md`` (all tables plus what was skipped and why).
Partial grids are fine: missing cells are shown as ``—``.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .figure2 import figure2_csv, figure2_curves, save_figure2_png
from .results import PAPER_TABLE2_SPLITS, ResultSet, canonical_method, load_results
from abmll.atomic import atomic_write_text

from .compare import comparison_csv, comparison_markdown, method_runs, per_task_tables, save_acc_vs_ece_png
from .tables import DEFAULT_ALPHA, Table, table1, table2, table3
from .uncertainty_figures import write_uncertainty_figures

__all__ = ["write_table", "write_figure2", "write_runs_csv", "compute_summary", "problems_markdown", "aggregate", "main"]


def write_table(table: Table, out_dir: Path, *, latex: bool = True) -> List[Path]:
    """``{name}.md``, ``{name}.csv`` and (optionally) ``{name}.tex`` in ``out_dir``."""
    paths = [
        atomic_write_text(out_dir / f"{table.name}.md", table.to_markdown(), parents=True),
        atomic_write_text(out_dir / f"{table.name}.csv", table.to_csv(), parents=True),
    ]
    if latex:
        paths.append(atomic_write_text(out_dir / f"{table.name}.tex", table.to_latex(), parents=True))
    return paths


def write_figure2(
    results: ResultSet,
    out_dir: Path,
    splits: Sequence[str],
    methods: Optional[Sequence[str]] = None,
    *,
    abmll_beta: Optional[float] = None,
) -> tuple:
    """``figure2.csv`` (all ``splits``) and ``figure2_{split}.png`` per split. Returns (paths, notes)."""
    paths, notes, curves_all = [], [], []
    for s in splits:
        curves = figure2_curves(results, s, methods, abmll_beta=abmll_beta)
        if not curves:
            continue
        curves_all.extend(curves)
        png = out_dir / f"figure2_{s}.png"
        note = save_figure2_png(curves, png)
        if note is None:
            paths.append(png)
        elif note not in notes:
            notes.append(note)
    paths.insert(0, atomic_write_text(out_dir / "figure2.csv", figure2_csv(curves_all), parents=True))
    return paths, notes


RUN_FIELDS = [
    "split", "method", "beta", "seed", "dtype", "cpu_capability", "best_epoch", "epochs",
    "test_accuracy", "test_ece", "test_nll", "test_brier",
    "val_accuracy", "val_ece", "pruned_fractions",
    "demonstrations", "tokens_per_test_prompt", "train_seconds", "test_seconds", "threads", "path",
]


def write_runs_csv(results: ResultSet, path: Path) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RUN_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in results.runs:
        t = r.test_metrics()
        w.writerow({
            "split": r.split,
            "method": r.method,
            "beta": "" if r.beta is None else repr(r.beta),
            "seed": r.seed,
            "dtype": r.dtype,
            "cpu_capability": r.cpu_capability,
            "best_epoch": r.data.get("best_epoch", ""),
            "epochs": r.data.get("epochs", ""),
            "test_accuracy": t.get("accuracy", ""),
            "test_ece": t.get("ece", ""),
            "test_nll": t.get("nll", ""),
            "test_brier": t.get("brier", ""),
            "val_accuracy": r.val_at_best.get("accuracy", ""),
            "val_ece": r.val_at_best.get("ece", ""),
            "pruned_fractions": ";".join(f"{f:g}" for f in sorted(r.pruning) if f > 0),
            **{key: "" if value is None else value for key, value in (
                ("demonstrations", r.demonstrations),
                ("tokens_per_test_prompt", r.tokens_per_test_prompt),
                ("train_seconds", r.train_seconds),
                ("test_seconds", r.test_seconds),
                ("threads", r.threads),
            )},
            "path": str(r.path),
        })
    return atomic_write_text(path, buf.getvalue(), parents=True)


def compute_summary(results: ResultSet) -> str:
    """Which compute dtype (and CPU capability) the runs used, so mixed dtypes are never pooled
    unseen (seeds of one cell in different dtypes are also reported as a config mismatch)."""
    counts: Dict[str, int] = {}
    for r in results.runs:
        kind = r.dtype + (f" on {r.cpu_capability}" if r.cpu_capability else "")
        counts[kind] = counts.get(kind, 0) + 1
    if not counts:
        return "Compute dtype: no runs."
    return "Compute dtype of the runs (CPU capability where recorded): " + "; ".join(
        f"{kind}: {n} run(s)" for kind, n in sorted(counts.items())
    ) + "."


def problems_markdown(results: ResultSet) -> str:
    if not results.problems:
        return "All results found were finished and usable.\n"
    lines = [f"{len(results.problems)} item(s) not used as finished runs:", ""]
    lines += [f"- {p.kind}: `{p.path}`: {p.message}" for p in results.problems]
    return "\n".join(lines) + "\n"


def aggregate(
    paths: Sequence[Path],
    out_dir: Path,
    *,
    alpha: float = DEFAULT_ALPHA,
    abmll_beta: Optional[float] = None,
    test_average: str = "mean",
    table1_splits: Optional[Sequence[str]] = None,
    table2_splits: Optional[Sequence[str]] = None,
    table3_splits: Optional[Sequence[str]] = None,
    figure_splits: Optional[Sequence[str]] = None,
    methods: Optional[Sequence[str]] = None,
    latex: bool = True,
    log=print,
) -> ResultSet:
    results = load_results(list(paths))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"aggregate: {len(results.runs)} finished run(s) from {', '.join(map(str, paths))}")
    log(f"aggregate: {compute_summary(results)}")
    for p in results.problems:
        log(f"aggregate: skipped {p}")
    sections = [
        "# Tables",
        "",
        f"Aggregated from: {', '.join(f'`{p}`' for p in paths)}; {len(results.runs)} finished run(s).",
        "",
        compute_summary(results),
        "",
    ]
    written: List[Path] = []
    t1 = table1(results, table1_splits, methods, alpha=alpha, abmll_beta=abmll_beta, test_average=test_average)
    t2_splits = table2_splits
    if t2_splits is None:  # splits whose runs carry pruning results
        t2_splits = [s for s in results.splits() if any(len(r.pruning) > 1 for r in results.select(split=s))]
        paper = PAPER_TABLE2_SPLITS
        t2_splits = sorted(t2_splits, key=lambda s: (paper.index(s) if s in paper else len(paper)))
    t2 = table2(results, t2_splits, methods, alpha=alpha, abmll_beta=abmll_beta)
    t3 = table3(results, table3_splits, alpha=alpha)
    for t in (t1, t2, t3):
        if t.is_empty():
            log(f"aggregate: {t.name}: no data, not written")
            sections += [f"## {t.title}", "", "No data.", ""]
            continue
        written += write_table(t, out_dir, latex=latex)
        sections += [t.to_markdown(), ""]
    fig_splits = figure_splits if figure_splits is not None else results.splits()
    fig_paths, notes = write_figure2(results, out_dir, fig_splits, methods, abmll_beta=abmll_beta)
    written += fig_paths
    for n in notes:
        log(f"aggregate: {n}")
    sections += [
        "## Figure 2",
        "",
        "Validation accuracy and ECE per epoch (mean over seeds, moving average over 3 epochs): "
        "`figure2.csv`" + "".join(f", `{p.name}`" for p in fig_paths[1:]) + ".",
    ] + [f"Note: {n}" for n in notes] + ["", "## Skipped", "", problems_markdown(results)]
    wanted = None if not methods else {canonical_method(m) for m in methods}
    for s in results.splits():
        by_method = method_runs(results, s, abmll_beta)
        if wanted is not None:  # --methods restricts the comparison as it does the tables
            by_method = {m: runs for m, runs in by_method.items() if m in wanted}
        if not by_method:
            continue
        comp_csv = comparison_csv(by_method)
        comp_md = comparison_markdown(by_method, s, alpha)
        task_md, task_csv = per_task_tables(by_method, s)
        written += [
            atomic_write_text(out_dir / f"comparison_{s}.csv", comp_csv, parents=True),
            atomic_write_text(out_dir / f"comparison_{s}.md", comp_md, parents=True),
            atomic_write_text(out_dir / f"per_task_{s}.md", task_md, parents=True),
            atomic_write_text(out_dir / f"per_task_{s}.csv", task_csv, parents=True),
        ]
        figs, fig_notes = write_uncertainty_figures(by_method, s, out_dir)
        written += figs
        for n in fig_notes:
            log(f"aggregate: {n}")
        png = out_dir / f"acc_vs_ece_{s}.png"
        note = save_acc_vs_ece_png(comp_csv, png, f"{s}: accuracy vs ECE on unseen tasks (mean ± SE over seeds)")
        if note:
            log(f"aggregate: {note}")
        else:
            written.append(png)
        sections += [comp_md, ""]
    written.append(write_runs_csv(results, out_dir / "runs.csv"))
    written.append(atomic_write_text(out_dir / "tables.md", "\n".join(sections), parents=True))
    log(f"aggregate: wrote {len(written)} file(s) to {out_dir}: {', '.join(p.name for p in written)}")
    return results


def _csv_list(value: Optional[str]) -> Optional[List[str]]:
    if value is None:
        return None
    return [v for v in (x.strip() for x in value.replace(",", " ").split()) if v]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="aggregate.py",
        description="Aggregate results.json files (searched recursively) into Tables 1-3 and Figure 2.",
    )
    p.add_argument("results", nargs="+", type=Path, help="directories (or results.json files) to read")
    p.add_argument("--out", type=Path, required=True, help="directory for the tables")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="Welch t-test level for bolding (default 0.05)")
    p.add_argument("--abmll-beta", type=float, default=None,
                   help="ABMLL beta used in Tables 1-2, Figure 2 and the comparison (default: the learner's default, 1e-8)")
    p.add_argument("--test-average", choices=["mean", "pooled"], default="mean",
                   help="Table 1: test metrics averaged over tasks (mean, default) or pooled over examples")
    p.add_argument("--splits", help="Table 1 splits (default: all found)")
    p.add_argument("--table2-splits", help="Table 2 splits (default: those with pruning results)")
    p.add_argument("--table3-splits", help="Table 3 splits (default: those with 2+ ABMLL betas)")
    p.add_argument("--figure-splits", help="Figure 2 splits (default: all found)")
    p.add_argument("--methods", help="methods to tabulate (default: all found)")
    p.add_argument("--no-latex", action="store_true", help="do not write .tex files")
    p.add_argument("--strict", action="store_true", help="exit 1 if any result was skipped")
    args = p.parse_args(argv)
    methods = _csv_list(args.methods)
    results = aggregate(
        args.results,
        args.out,
        alpha=args.alpha,
        abmll_beta=args.abmll_beta,
        test_average=args.test_average,
        table1_splits=_csv_list(args.splits),
        table2_splits=_csv_list(args.table2_splits),
        table3_splits=_csv_list(args.table3_splits),
        figure_splits=_csv_list(args.figure_splits),
        methods=[canonical_method(m) for m in methods] if methods else None,
        latex=not args.no_latex,
    )
    if not results.runs:
        print("aggregate: no finished runs found", file=sys.stderr)
        return 1
    return 1 if (args.strict and results.problems) else 0


if __name__ == "__main__":
    sys.exit(main())
