"""The embedded offline default: SmolLM2-135M, BIG-bench multiple-choice tasks, ABMLL vs
the pretrained model on unseen tasks. Run through ``bash scripts/run_default.sh``.

Steps (each skipped when already done, so a rerun or a stopped run picks up where it was):
1. build the BIG-bench task directory (``abmll-data prepare bigbench-mc``, pip download);
2. ``tune run abmll_recipe --config smollm2_135m/pretrained`` (the model is fetched on first use);
3. ``tune run abmll_recipe --config smollm2_135m/abmll``;
4. print the unseen-task test metrics of both, side by side.

    python scripts/offline_default.py [--out outputs/default] [key=value ...]

``--config-prefix tiny`` runs the same steps on the tiny configs (a random tiny model and the
built-in tiny task set; no download, no BIG-bench build, seconds on a CPU): a check of the
script itself, used by the tests.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from abmll.cache import cache_root

# One epoch over the 33 training tasks and no validation (with one epoch there is nothing to
# select): about 30 minutes on 2 AVX2 cores in fp32, 10-12 on 2 Zen 4 cores in bf16
# (docs/performance.md). The configs
# themselves (2 epochs, validated) are what the offline profile of the table scripts runs.
DEFAULT_OVERRIDES = ("epochs=1", "eval.validate=false")
# Config families the script can run: the model's name for the table, and whether the configs
# read the BIG-bench task directory (the tiny configs use their built-in tasks).
CONFIG_PREFIXES = {
    "smollm2_135m": ("SmolLM2-135M", True),
    "tiny": ("tiny random model", False),
}


def _bin(name: str) -> str:
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else (shutil.which(name) or name)


def _run(cmd: list, label: str) -> None:
    print(f"\n[default] {label}\n[default] $ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        sys.exit(f"[default] failed ({label}), exit code {proc.returncode}")
    print(f"[default] {label}: done in {time.perf_counter() - t0:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/default", help="where the two runs write (default: %(default)s)")
    parser.add_argument("--data-dir", default=None, help="BIG-bench task dir (default: $ABMLL_CACHE/bigbench-mc)")
    parser.add_argument(
        "--config-prefix", default="smollm2_135m", choices=sorted(CONFIG_PREFIXES),
        help="run {prefix}/pretrained and {prefix}/abmll (default: %(default)s; "
        "tiny: the built-in tiny tasks, no BIG-bench build)",
    )
    parser.add_argument(
        "overrides", nargs="*",
        help="key=value overrides passed to both runs, after the defaults "
        f"{' '.join(DEFAULT_OVERRIDES)} (about 30 minutes on 2 AVX2 cores in fp32)",
    )
    args = parser.parse_args()
    model_label, uses_bigbench = CONFIG_PREFIXES[args.config_prefix]
    if args.data_dir and not uses_bigbench:
        parser.error(f"--data-dir: the {args.config_prefix} configs use their built-in tasks")
    start = time.perf_counter()

    data_args = []
    if uses_bigbench:
        data_dir = Path(args.data_dir) if args.data_dir else cache_root() / "bigbench-mc"
        _run([_bin("abmll-data"), "prepare", "bigbench-mc", "--out", str(data_dir)], "BIG-bench tasks")
        data_args = [f"data.data_dir={data_dir}"]

    out = Path(args.out)
    results = {}
    for method in ("pretrained", "abmll"):
        run_dir = out / method
        _run(
            [
                _bin("tune"), "run", "abmll_recipe", "--config", f"{args.config_prefix}/{method}",
                f"output_dir={run_dir}", *data_args,
                "resume_from_checkpoint=True", *DEFAULT_OVERRIDES, *args.overrides,
            ],
            f"{method} on unseen {'BIG-bench' if uses_bigbench else args.config_prefix} tasks",
        )
        results[method] = json.loads((run_dir / "results.json").read_text())

    print(f"\nUnseen-task test metrics ({model_label}, split {results['abmll']['split']}, "
          f"seed {results['abmll']['seed']}; mean over tasks)\n")
    print(f"| {'method':<10} | best epoch | accuracy | ECE   | NLL   | Brier | AURC  | ECE + TS | flip rate |")
    print(f"|{'-' * 12}|------------|----------|-------|-------|-------|-------|----------|-----------|")
    for method, res in results.items():
        m = res["test"]["mean"]
        ts = (res.get("test_ts") or {}).get("mean") or {}
        flip = ((res.get("posterior") or {}).get("flip") or {}).get("flip_rate")
        print(f"| {res['method']:<10} | {res['best_epoch']:>10} | {100 * m['accuracy']:7.1f}% | "
              f"{m['ece']:.3f} | {m['nll']:.3f} | {m['brier']:.3f} | {m.get('aurc', float('nan')):.3f} | "
              f"{ts.get('ece', float('nan')):8.3f} | {'—' if flip is None else f'{100 * flip:.2f}%':>9} |")
    print("\nECE: top-label, 15 equal-width bins, a fraction. AURC: area under the risk-coverage curve "
          "(lower is better). ECE + TS: after one temperature per task fitted on its support examples. "
          "Flip rate: test answers that change between one weight sample and the mean mode (ABMLL).")
    tasks = list(results["abmll"]["test"]["per_task"])
    print(f"\n| {'task':<38} | pretrained acc / ECE | ABMLL acc / ECE |")
    print(f"|{'-' * 40}|----------------------|-----------------|")
    for task in tasks:
        p = results["pretrained"]["test"]["per_task"][task]
        a = results["abmll"]["test"]["per_task"][task]
        print(f"| {task:<38} | {100 * p['accuracy']:5.1f}% / {p['ece']:.3f}       | "
              f"{100 * a['accuracy']:5.1f}% / {a['ece']:.3f}  |")
    print(f"\n[default] results: {out}/*/results.json; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
