"""Does sampling the Gaussian LoRA weights wreck the pretrained model? Accuracy and ECE on
the unseen validation tasks at initialisation (B = 0, so log sigma^2 = c everywhere), one
weight sample per forward against the deterministic mean, for several c. No training, no
test-time adaptation. Used to choose the default c (docs/notes.md, note 1).

    python scripts/check_sampling_noise.py --data-dir ~/.cache/abmll/bigbench-mc \
        --c -20 -12 -8 -5 --max-eval 40
"""

from __future__ import annotations

import argparse
import os

import torch

from abmll.data import TaskSampler, load_split, option_token_ids
from abmll.evaluation import evaluate_unseen_tasks
from abmll.learners import Pretrained
from abmll.models import SmolLM2Checkpointer, gaussian_lora_smollm2_135m, smollm2_tokenizer
from abmll.modules import DEFAULT_C, gaussian_lora_modules, gaussian_mode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cache = os.environ.get("ABMLL_CACHE", os.path.expanduser("~/.cache/abmll"))
    p.add_argument("--data-dir", default=os.path.join(cache, "bigbench-mc"))
    p.add_argument("--split", default="bigbench-mc")
    # The first c is also the one the "mean" row uses: the layers' default.
    p.add_argument("--c", type=float, nargs="+", default=[DEFAULT_C, -12.0, -8.0, -5.0])
    p.add_argument("--max-eval", type=int, default=40, help="examples per task")
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    tokenizer = smollm2_tokenizer()
    split = load_split(args.split, args.data_dir)
    sampler = TaskSampler(split.val, tokenizer, batch_size=2, max_seq_len=args.max_seq_len, seed=args.seed)
    option_ids = torch.tensor(option_token_ids(tokenizer))
    model = gaussian_lora_smollm2_135m()
    model.load_state_dict(SmolLM2Checkpointer().load_checkpoint()["model"], strict=False)
    model.eval()
    learner = Pretrained()  # no test-time adaptation; the 10 support examples are held out as in the recipe
    learner.setup(model, torch.device("cpu"))

    rows = []
    for mode, cs in (("mean", [args.c[0]]), ("sample", args.c)):
        for c in cs:
            for _, layer in gaussian_lora_modules(model):
                layer.c = c
            with gaussian_mode(model, mode):
                res = evaluate_unseen_tasks(
                    learner, sampler, option_ids, num_support=5, max_eval_examples=args.max_eval,
                    desc=f"{mode} c={c:g}",
                )
            rows.append((mode, "-" if mode == "mean" else f"{c:g}", res["mean"]["accuracy"], res["mean"]["ece"]))
            print(f"{mode:6} c={rows[-1][1]:>4}: accuracy {rows[-1][2]:.4f} ECE {rows[-1][3]:.4f}", flush=True)

    print(f"\nSmolLM2-135M at initialisation, {len(split.val)} unseen validation tasks of {args.split}, "
          f"up to {args.max_eval} examples each, seed {args.seed}\n")
    print("| mode | c | accuracy | ECE |\n|---|---|---|---|")
    for mode, c, acc, ece in rows:
        print(f"| {mode} | {c} | {100 * acc:.1f}% | {ece:.3f} |")


if __name__ == "__main__":
    main()
