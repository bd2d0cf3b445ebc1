"""The grid of runs behind the reproduce scripts: profiles, and one ``tune run`` per cell.

Every run is an independent ``tune run abmll_recipe --config PREFIX/METHOD key=value ...``
with its own ``output_dir`` (layout: :mod:`abmll.run_contract`):

* Tables 1, 2 and Figure 2: ``OUT/runs/{split}/{method key}/seed{n}``
* Table 3 (ABMLL beta sweep): ``OUT/runs/{split}/abmll_beta{log10 beta}/seed{n}``; the
  config's own beta (the learner's default) is the Table 1 run ``OUT/runs/{split}/abmll/seed{n}``,
  shared.

Table 1 runs always evaluate pruning (``eval.prune_fractions=[0.01,0.1,0.2,0.3]``), so Table 2
needs no training of its own: it runs (or reuses) Table 1's grid on its splits.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from abmll.reporting.results import PAPER_SPLITS, PAPER_TABLE2_SPLITS, default_abmll_beta, log10_beta
from abmll.run_contract import RunDir
from abmll.run_contract import method as registry_method

__all__ = [
    "PROFILES",
    "Profile",
    "RunSpec",
    "PRUNE_OVERRIDE",
    "DEFAULT_BETAS",
    "common_overrides",
    "table1_specs",
    "table3_specs",
    "config_beta",
]

PRUNE_FRACTIONS = (0.01, 0.1, 0.2, 0.3)
PRUNE_OVERRIDE = "eval.prune_fractions=[" + ",".join(f"{f:g}" for f in PRUNE_FRACTIONS) + "]"
DEFAULT_BETAS = (0.0, -5.0, -8.0, -16.0)  # log10 beta, the paper's Table 3


@dataclass(frozen=True)
class Profile:
    name: str
    config_prefix: str
    splits: Sequence[str]  # Table 1
    table2_splits: Sequence[str]
    table3_split: str
    figure_split: str
    seeds: Sequence[int] = (0, 1, 2)
    overrides: Sequence[str] = ()  # appended to every run (before the user's --set)
    needs_data_dir: bool = False
    needs_checkpoint_dir: bool = False
    # Tokenizer files that live with the weights, as (tokenizer key, file name): Llama3's
    # CHECKPOINT_DIR/tokenizer.model; Qwen2's vocab.json and merges.txt. --tokenizer-path
    # replaces the first (tokenizer.path).
    tokenizer_files: Tuple[Tuple[str, str], ...] = ()
    model_name: str = ""  # named where the weights are asked for
    jobs: int = 1
    description: str = ""


_PAPER = Profile(
    name="paper",
    config_prefix="llama3_8b",
    splits=PAPER_SPLITS,
    table2_splits=PAPER_TABLE2_SPLITS,
    table3_split="cls45",
    figure_split="cls45",
    needs_data_dir=True,
    needs_checkpoint_dir=True,
    tokenizer_files=(("path", "tokenizer.model"),),
    model_name="Llama3-8B-Instruct",
    description="Llama3-8B, CrossFit/UnifiedQA splits, epochs from the llama3_8b configs (500), "
    "3 seeds; one GPU (the paper: an A100 40GB)",
)


PROFILES: Dict[str, Profile] = {
    "paper": _PAPER,
    # The paper's later version adds Qwen2-7B-Instruct: the same grid on the qwen2_7b configs.
    "paper-qwen2": replace(
        _PAPER,
        name="paper-qwen2",
        config_prefix="qwen2_7b",
        tokenizer_files=(("path", "vocab.json"), ("merges_file", "merges.txt")),
        model_name="Qwen2-7B-Instruct",
        description="the paper profile on Qwen2-7B-Instruct (the paper's later version) with the "
        "qwen2_7b configs; one GPU",
    ),
    "offline": Profile(
        name="offline",
        config_prefix="smollm2_135m",
        splits=("bigbench-mc",),
        table2_splits=("bigbench-mc",),
        table3_split="bigbench-mc",
        figure_split="bigbench-mc",
        # Sized for 2 CPU cores (scripts/README.md, "Time"): the configs' 2 epochs, half the
        # configs' evaluation examples (evaluation dominates: validation every epoch, the test
        # unpruned + 4 pruning fractions). max_seq_len 512: with the configs' 256 some
        # bigbench-mc prompts (parsinlu_qa) do not fit and the run stops with an error.
        overrides=("data.max_eval_examples_per_task=20",),
        description="SmolLM2-135M on the offline BIG-bench split, CPU, a few hours",
    ),
    "smoke": Profile(
        name="smoke",
        config_prefix="tiny",
        splits=("tiny",),
        table2_splits=("tiny",),
        table3_split="tiny",
        figure_split="tiny",
        overrides=("epochs=2",),
        jobs=2,
        description="tiny random model, built-in tiny split, minutes",
    ),
}


@dataclass
class RunSpec:
    name: str  # e.g. "tiny/abmll/seed0"
    config: str  # e.g. "tiny/abmll"
    output_dir: Path
    overrides: List[str]

    def command(self, tune: Sequence[str]) -> List[str]:
        return [*tune, "run", "abmll_recipe", "--config", self.config, *self.overrides]

    @property
    def run_dir(self) -> RunDir:
        return RunDir(self.output_dir)

    def is_finished(self) -> bool:
        return self.run_dir.is_finished()


def _format_log10(lb: float) -> str:
    return f"{lb:g}"


def _beta_value(lb: float) -> str:
    if math.isinf(lb) and lb < 0:
        return "0.0"
    if float(lb).is_integer():
        return f"1e{int(lb)}"
    return repr(10.0**lb)


def common_overrides(profile: Profile, args) -> List[str]:
    out = list(profile.overrides)
    if getattr(args, "epochs", None) is not None:
        out.append(f"epochs={args.epochs}")
    if args.data_dir is not None:
        out.append(f"data.data_dir={Path(args.data_dir).expanduser().resolve()}")
    elif profile.needs_data_dir and not os.environ.get("ABMLL_METAICL_DATA"):
        out.append("data.data_dir=<DATA_DIR>")
    ckpt = Path(args.checkpoint_dir).expanduser().resolve() if args.checkpoint_dir is not None else None
    if ckpt is not None:
        out.append(f"checkpointer.checkpoint_dir={ckpt}")
    elif profile.needs_checkpoint_dir:
        out.append("checkpointer.checkpoint_dir=<CHECKPOINT_DIR>")
    where = str(ckpt) if ckpt is not None else "<CHECKPOINT_DIR>"
    for key, name in profile.tokenizer_files:
        if key == "path" and args.tokenizer_path is not None:
            continue
        out.append(f"tokenizer.{key}={where}/{name}")
    if args.tokenizer_path is not None:
        out.append(f"tokenizer.path={Path(args.tokenizer_path).expanduser().resolve()}")
    out.extend(args.set or [])
    return out


def _run_spec(profile: Profile, out: Path, split: str, method: str, seed: int, dirname: str,
              common: List[str], extra: Sequence[str] = (), prune: bool = True) -> RunSpec:
    output_dir = (out / "runs" / split / dirname / f"seed{seed}").resolve()
    entry = registry_method(method)
    overrides = [
        f"output_dir={output_dir}",
        f"seed={seed}",
        f"split={split}",
        "resume_from_checkpoint=True",
        *([PRUNE_OVERRIDE] if prune else []),
        *entry.overrides,
        *extra,
        *common,
    ]
    return RunSpec(
        name=f"{split}/{dirname}/seed{seed}",
        config=f"{profile.config_prefix}/{entry.config}",
        output_dir=output_dir,
        overrides=overrides,
    )


def table1_specs(profile: Profile, out: Path, splits: Sequence[str], methods: Sequence[str],
                 seeds: Sequence[int], common: List[str]) -> List[RunSpec]:
    """methods x splits x seeds, seed slowest: a sweep stopped part-way leaves whole seeds
    (every method compared on the same seeds) rather than some methods with all seeds."""
    specs = []
    for seed in seeds:
        for split in splits:
            for method in methods:
                specs.append(_run_spec(profile, out, split, method, seed, registry_method(method).key, common))
    return specs


def config_beta(profile: Profile) -> float:
    """The beta of the profile's ABMLL config (the learner's default if it cannot be read)."""
    try:
        from omegaconf import OmegaConf

        from abmll.config_registry import resolve_config

        return float(OmegaConf.load(resolve_config(f"{profile.config_prefix}/abmll")).learner.beta)
    except Exception:
        return default_abmll_beta()


def table3_specs(profile: Profile, out: Path, split: str, betas: Sequence[float],
                 seeds: Sequence[int], common: List[str]) -> List[RunSpec]:
    """ABMLL for each log10 beta; the config's own beta is the shared Table 1 run."""
    default_lb = log10_beta(config_beta(profile))
    user_beta = any(o.startswith("learner.beta=") for o in common)
    specs = []
    for lb in betas:
        for seed in seeds:
            if lb == default_lb and not user_beta:
                specs.append(_run_spec(profile, out, split, "ABMLL", seed, "abmll", common))
            else:
                specs.append(
                    _run_spec(profile, out, split, "ABMLL", seed, f"abmll_beta{_format_log10(lb)}",
                              common, extra=[f"learner.beta={_beta_value(lb)}"], prune=False)
                )
    return specs


