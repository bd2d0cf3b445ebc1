"""``scripts/reproduce_{table1,table2,table3,figure2}.py``: build the grid, run it, tabulate."""

from __future__ import annotations

import argparse
import os
import shlex
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from abmll.reporting.results import load_results
from abmll.run_contract import METHODS, PAPER_METHODS
from abmll.run_contract import method as registry_method

from .grid import DEFAULT_BETAS, PROFILES, Profile, common_overrides, config_beta, table1_specs, table3_specs
from .runner import run_specs, summarize_outcomes, tune_command

__all__ = ["build_parser", "main"]


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
        try:
            methods.append(registry_method(n).name)
        except KeyError as err:
            raise SystemExit(f"error: --methods: {err.args[0]}") from None
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
                       help="methods (default the paper's: " + " ".join(m.key for m in METHODS if m.in_paper)
                       + "; also: " + " ".join(m.key for m in METHODS if not m.in_paper) + ")")
    if what == "table3":
        p.add_argument("--betas", nargs="+", default=None,
                       help="log10 beta values (default 0 -5 -8 -16)")
    p.add_argument("--data-dir", default=None, help="task directory (data.data_dir); required for paper and paper-qwen2")
    p.add_argument("--checkpoint-dir", default=None,
                   help="model weights (checkpointer.checkpoint_dir); required for paper and paper-qwen2")
    p.add_argument("--tokenizer-path", default=None,
                   help="tokenizer file (tokenizer.path); default for paper: CHECKPOINT_DIR/tokenizer.model, "
                   "for paper-qwen2: CHECKPOINT_DIR/vocab.json (and merges.txt)")
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
        missing.append(f"--checkpoint-dir ({profile.model_name or 'model'} weights, e.g. from `tune download`)")
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
    from abmll.reporting.aggregate import problems_markdown, write_figure2, write_table
    from abmll.reporting.tables import table1, table2, table3

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
    common = common_overrides(profile, args)
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
            mark = "  # finished, would skip" if s.is_finished() else ""
            log(shlex.join(s.command(tune)) + mark)
        log(f"# {len(specs)} runs ({sum(s.is_finished() for s in specs)} finished); outputs under {out.resolve()}/runs")
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
