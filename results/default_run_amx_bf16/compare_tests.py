"""The table of README.md: ties, flips and agreement between tests of one trained θ.

    python compare_tests.py abmll abmll_tested_bf16_f32logits abmll_tested_fp32   # from this folder
The last folder is the reference the others' answers are compared with."""
import json
import sys

import numpy as np
import pandas as pd


def top_ties(probs, num_options) -> int:
    """Examples whose two largest option probabilities are exactly equal."""
    tops = (np.sort(np.asarray(p)[:n])[-2:] for p, n in zip(probs, num_options))
    return sum(int(second == first) for second, first in tops)


folders = sys.argv[1:]
answers = {}
print("| test | dtype | accuracy | ECE | NLL | exact ties at the top | flip rate (1 sample vs mean) | mean abs Δp |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for d in folders:
    r = json.load(open(f"{d}/results.json"))
    p = pd.read_parquet(f"{d}/predictions_test.parquet")
    f, m = r["posterior"]["flip"], r["test"]["mean"]
    print(f"| {d} | {r['precision']['dtype']} | {100 * m['accuracy']:.1f}% | {m['ece']:.3f} | {m['nll']:.3f} | "
          f"{top_ties(p.probs, p.num_options)} of {len(p)} | "
          f"{100 * f['flip_rate']:.2f}% ({round(f['flip_rate'] * f['n'])} of {f['n']}) | {f['mean_abs_dp']:.1e} |")
    answers[d] = p.set_index(["task", "example"]).pred
ref = folders[-1]
for d in folders[:-1]:
    j = answers[d].to_frame("a").join(answers[ref].to_frame("b"), how="inner")
    print(f"answers that differ, {d} vs {ref}: {(j.a != j.b).sum()} of {len(j)}")
