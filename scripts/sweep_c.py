"""Does the posterior matter, and for which c? ABMLL at several log-variance offsets c, one
seed, then one table: accuracy, ECE, NLL, mutual information, the flip rate between one weight
sample and the mean mode, and the learned log-variances against c.

    python scripts/sweep_c.py --out results/c_sweep [key=value ...] [--c -20 -12 -10 -8]

Each run is ``tune run abmll_recipe --config CONFIG model.c=C`` with the overrides (default: the
offline default's protocol, one epoch without validation, and ``eval.num_samples=[1,4]`` so the
mutual information is measured), in ``OUT/c{C}``. Resumable: a finished run is not redone.
The table is written to ``OUT/c_sweep.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

DEFAULT_OVERRIDES = ("epochs=1", "eval.validate=false", "eval.num_samples=[1,4]")


def _tune() -> str:
    local = Path(sys.executable).with_name("tune")
    return str(local) if local.exists() else (shutil.which("tune") or "tune")


def table(out: Path, cs) -> str:
    lines = [
        "| c | weight std e^(c/2) | accuracy | ECE | NLL | MI (nats, largest S) | flip rate | mean max abs dp "
        "| lv_phi q01 / q50 / q99 | noise std / abs(W0 + mu) q50 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    import math

    for c in cs:
        path = out / f"c{c:g}" / "results.json"
        if not path.exists():
            lines.append(f"| {c:g} | {math.exp(c / 2):.1e} | (not run) | | | | | | | |")
            continue
        res = json.loads(path.read_text())
        m, post = res["test"]["mean"], res.get("posterior") or {}
        flip = post.get("flip") or {}
        lv = (post.get("all") or {}).get("lv_phi") or {}
        rel = (post.get("all") or {}).get("rel_noise_std") or {}
        lines.append(
            f"| {c:g} | {math.exp(c / 2):.1e} | {100 * m['accuracy']:.1f}% | {m['ece']:.3f} | {m['nll']:.3f} | "
            f"{m.get('mi', float('nan')):.2e} | {100 * flip.get('flip_rate', float('nan')):.2f}% | "
            f"{flip.get('mean_abs_dp', float('nan')):.2e} | {lv.get('q01', float('nan')):.3f} / "
            f"{lv.get('q50', float('nan')):.3f} / {lv.get('q99', float('nan')):.3f} | {rel.get('q50', float('nan')):.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", default="smollm2_135m/abmll")
    p.add_argument("--c", type=float, nargs="+", default=[-20.0, -12.0, -10.0, -8.0])
    p.add_argument("--table-only", action="store_true", help="print the table of the finished runs")
    p.add_argument("overrides", nargs="*", help=f"key=value for every run (after {' '.join(DEFAULT_OVERRIDES)})")
    args = p.parse_intermixed_args()  # overrides may follow --c's values
    if not args.table_only:
        for c in args.c:
            run_dir = args.out / f"c{c:g}"
            cmd = [_tune(), "run", "abmll_recipe", "--config", args.config, f"model.c={c:g}",
                   f"output_dir={run_dir}", "resume_from_checkpoint=True", *DEFAULT_OVERRIDES, *args.overrides]
            print(f"[sweep_c] $ {' '.join(cmd)}", flush=True)
            if subprocess.run(cmd).returncode != 0:
                sys.exit(f"[sweep_c] the run at c={c:g} failed; rerun to resume")
    text = table(args.out, args.c)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "c_sweep.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
