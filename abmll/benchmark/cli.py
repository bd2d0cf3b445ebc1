"""Command lines of the two benchmark scripts: parse arguments, start the workers, print the table.

* ``main``: ``scripts/benchmark_memory.py`` (and the ``--worker`` / ``--call`` modes of the
  worker processes, ``python -m abmll.benchmark``).
* ``benchmark_main``: ``scripts/benchmark.py``.

Imports nothing heavy at module level, so ``--help`` is fast; torch, torchtune and the models are
loaded in the workers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from abmll.benchmark.report import benchmark_report, flop_floor, layer_flop_floors, report
from abmll.benchmark.workers import MARK, run_call, call_worker, run_worker

PAIRS = ("tiny", "smollm2_135m", "llama3_8b", "qwen2_7b")
#: ``abmll.modules.gaussian_lora.SAMPLINGS``, spelled here so that ``--help`` imports no torch
#: (tests/test_benchmark.py checks that the two agree).
SAMPLING_CHOICES = ("local", "weight")
#: ``scripts/benchmark_memory.py``'s description.
MEMORY_DESCRIPTION = "Peak training memory and speed of ABMLL against Regular LoRA on the same model and batch."


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="benchmark_memory.py", description=MEMORY_DESCRIPTION)
    p.add_argument("--config-pair", choices=PAIRS, default="tiny",
                   help="configs {pair}/abmll and {pair}/regular_lora (default tiny)")
    p.add_argument("--abmll-config", default=None, help="override the ABMLL config (name or path)")
    p.add_argument("--lora-config", default=None, help="override the Regular LoRA config (name or path)")
    p.add_argument("--episodes", type=int, default=2, help="training episodes per method (default 2)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per example (default: data.max_seq_len)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: the config's)")
    p.add_argument("--load-weights", action="store_true", help="load the checkpointer's weights (default: random)")
    p.add_argument("--sampling", choices=SAMPLING_CHOICES, default=None,
                   help="ABMLL's training estimator, overriding the config's model.sampling "
                   "(default: the config's, weight)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for both (repeatable)")
    p.add_argument("--json", type=Path, default=None, help="also write both measurements to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--call", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.call:
        return run_call(args.call)
    if args.worker:
        from abmll.benchmark.measure import measure

        res = measure(args.worker, args.set or [], episodes=args.episodes, seq_len=args.seq_len,
                      load_weights=args.load_weights, device=args.device, sampling=args.sampling)
        print(MARK + json.dumps(res), flush=True)
        return 0

    lora_cfg = args.lora_config or f"{args.config_pair}/regular_lora"
    abmll_cfg = args.abmll_config or f"{args.config_pair}/abmll"
    try:
        print(f"measuring {lora_cfg} ...", flush=True)
        lora = run_worker(lora_cfg, args)
        print(f"measuring {abmll_cfg} ...", flush=True)
        abmll = run_worker(abmll_cfg, args)
    except RuntimeError as err:
        print(f"benchmark_memory: error: {err}", file=sys.stderr)
        return 1
    print()
    print(report(lora, abmll))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"regular_lora": lora, "abmll": abmll}, indent=2))
        print(f"\nwrote {args.json}")
    return 0



def benchmark_main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="benchmark.py",
        description="Time and memory of ABMLL against Regular LoRA on the same model and batches.",
    )
    p.add_argument("--config-pair", choices=PAIRS, default="tiny",
                   help="configs {pair}/abmll and {pair}/regular_lora (default tiny)")
    p.add_argument("--abmll-config", default=None, help="override the ABMLL config (name or path)")
    p.add_argument("--lora-config", default=None, help="override the Regular LoRA config (name or path)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default=None,
                   help="default: the configs' (auto: bf16 only where the hardware computes it natively)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: the configs')")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per example (default: data.max_seq_len)")
    p.add_argument("--batch-size", type=int, default=None, help="default: data.batch_size")
    p.add_argument("--rounds", type=int, default=3, help="timed alternating rounds (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the workers (default: torch's)")
    p.add_argument("--sampling", choices=SAMPLING_CHOICES, default=None,
                   help="ABMLL's training estimator, overriding the config's model.sampling "
                   "(default: the config's, weight)")
    p.add_argument("--layer-shape", default="4096x4096", help="d_out x d_in of the layer rows (default: "
                   "Llama3-8B's q_proj); 'none' skips them")
    p.add_argument("--layer-tokens", type=int, default=512, help="tokens of the layer rows (default 512)")
    p.add_argument("--memory-episodes", type=int, default=1,
                   help="episodes of the peak-memory runs, each method in its own process (default 1; 0 skips)")
    p.add_argument("--load-weights", action="store_true",
                   help="load the checkpointer's weights (default: random weights; timing does not depend on them)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile both models (each transformer layer, as the recipe's compile: true) "
                   "and the single layers before timing; the warm-up rounds absorb the compilation and "
                   "are reported apart (needs --warmup >= 1). The peak-memory runs stay eager")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for both (repeatable)")
    p.add_argument("--json", type=Path, default=None, help="also write all measurements to this JSON file")
    args = p.parse_args(argv)
    if args.compile and args.warmup < 1:
        p.error("--compile needs --warmup >= 1: the warm-up rounds absorb the compilation")

    overrides = list(args.set or [])
    if args.dtype:
        overrides.append(f"dtype={args.dtype}")
    if args.batch_size:
        overrides.append(f"data.batch_size={args.batch_size}")
    if args.device:
        overrides.append(f"device={args.device}")
    configs = {"abmll": args.abmll_config or f"{args.config_pair}/abmll",
               "regular_lora": args.lora_config or f"{args.config_pair}/regular_lora"}
    common = dict(seq_len=args.seq_len, device=args.device, load_weights=args.load_weights)
    try:
        print(f"timing {configs['abmll']} and {configs['regular_lora']} "
              f"({args.warmup} + {args.rounds} rounds{', compiled' if args.compile else ''}) ...", flush=True)
        timing = call_worker("time_pair", dict(configs=configs, overrides=overrides, rounds=args.rounds,
                                               warmup=args.warmup, sampling=args.sampling,
                                               compile=args.compile, **common),
                             args.threads, "timing")
        layers = []
        if args.layer_shape.lower() != "none":
            d_out, d_in = (int(v) for v in args.layer_shape.lower().split("x"))
            print(f"timing one {d_out}x{d_in} layer ...", flush=True)
            layers.append(call_worker("time_layer", dict(
                d_out=d_out, d_in=d_in, tokens=args.layer_tokens, dtype=timing["dtype"].replace(
                    "float32", "fp32").replace("bfloat16", "bf16"), device=timing["device"],
                rounds=args.rounds, warmup=args.warmup, compile=args.compile), args.threads, "layer"))
        memory = None
        if args.memory_episodes > 0:
            memory = {}
            for label, cfg in configs.items():
                print(f"peak memory of {cfg} ...", flush=True)
                memory[label] = call_worker("measure", dict(config=cfg, overrides=overrides,
                                                            episodes=args.memory_episodes,
                                                            sampling=args.sampling, **common),
                                            args.threads, cfg)
    except RuntimeError as err:
        print(f"benchmark: error: {err}", file=sys.stderr)
        return 1
    weights = "pretrained weights" if args.load_weights else "random weights"
    print()
    print(benchmark_report(args.config_pair, timing, memory, layers, weights))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        floor = {"episode": flop_floor(timing), "layers": [layer_flop_floors(lay) for lay in layers]}
        args.json.write_text(json.dumps({"timing": timing, "memory": memory, "layers": layers,
                                         "flop_floor": floor}, indent=2))
        print(f"\nwrote {args.json}")
    return 0
