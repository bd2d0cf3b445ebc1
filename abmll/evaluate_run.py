"""``abmll evaluate RUN_DIR --out DIR [key=value ...]``: test a finished run again, with other
evaluation settings, without training it again.

The run's own config (``results.json``'s ``config``) is rebuilt with the overrides, which may
change only how the test is done (:data:`EVAL_KEYS`): every ``eval.*`` key, the test data
(``split``, ``data.split_file``, ``data.data_dir``, ``data.max_eval_examples_per_task``,
``data.eval_batch_size``), the ``device`` and the compute ``dtype`` (the adapters are float32
either way, so a bf16 run can be tested in fp32 to tell its numbers from bf16's rounding). A
training key is refused in one line naming it.

The recipe then sets up as it did for the run (same seed, model and base weights), loads the
run's last checkpoint (adapters, best epoch, history and the RNG state the run's test started
from) and runs the recipe's own end of run into ``DIR``: the test with the best epoch's adapters
(``--adapters final``: the last epoch's), ``results.json`` with the same schema, the predictions
file and the PEFT exports. So unchanged keys reproduce the run's test exactly, and RUN_DIR is
only read. Runs without a checkpoint (Pretrained trains nothing) are rebuilt from their seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

__all__ = ["EVAL_KEYS", "check_eval_overrides", "evaluate_run", "read_finished_run", "main"]

#: What ``abmll evaluate`` may change: a key equal to one of these, or under one ending in ".".
EVAL_KEYS = (
    "eval.",
    "split",
    "data.split_file",
    "data.data_dir",
    "data.max_eval_examples_per_task",
    "data.eval_batch_size",
    "device",
    "dtype",
)


class EvaluateError(ValueError):
    """The run or the overrides cannot be used; one line naming the file or key."""


def check_eval_overrides(overrides: Sequence[str]) -> None:
    """Refuse an override that is not ``key=value`` or that changes training, naming the key."""
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise EvaluateError(f"override {item!r} is not key=value")
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in EVAL_KEYS):
            raise EvaluateError(
                f"'{key}' is a training key: abmll evaluate changes only how the run is tested "
                f"({', '.join(k + '*' if k.endswith('.') else k for k in EVAL_KEYS)}); train a new run to change it"
            )


def read_finished_run(run, overrides: Sequence[str] = ()):
    """(the run's results record, its config with ``overrides``) of a finished run; ``dtype:
    auto`` (unless overridden) becomes the dtype the run used, so that a test repeats the same
    computation."""
    from omegaconf import OmegaConf

    from abmll.config_registry import fill_builder_default
    from abmll.run_contract import RESUME_ADDED_DEFAULTS

    saved = run.read_results()
    if saved is None or saved.get("finished") is not True:
        raise EvaluateError(f"{run.results}: no finished run there (its test has not been measured yet)")
    cfg = OmegaConf.create(saved["config"])
    # A run recorded before model.sampling existed trained with local, whatever the builders'
    # default is now (run_contract.RESUME_ADDED_DEFAULTS).
    fill_builder_default(cfg.get("model"), "sampling", RESUME_ADDED_DEFAULTS[("model", "sampling")])
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    if cfg.get("dtype") == "auto" and (saved.get("precision") or {}).get("dtype"):
        cfg.dtype = saved["precision"]["dtype"]
    return saved, cfg


def evaluate_run(run_dir: Path, out: Path, overrides: Sequence[str] = (), adapters: str = "best") -> Dict[str, Any]:
    """Test ``run_dir``'s adapters again into ``out``; returns the new results record."""
    import torch

    import abmll_recipe
    from abmll.atomic import atomic_write_text
    from abmll.config_keys import check_config_keys
    from abmll.run_contract import RunDir

    run, target = RunDir(run_dir), RunDir(out)
    if adapters not in ("best", "final"):
        raise EvaluateError(f"--adapters must be best or final, got {adapters!r}")
    check_eval_overrides(overrides)
    if Path(out).resolve() == Path(run_dir).resolve():
        raise EvaluateError(f"--out {out}: must not be the run's own directory (abmll evaluate never writes there)")
    if target.results.exists():
        raise EvaluateError(f"--out {out}: already holds a results.json; choose another directory")
    saved, cfg = read_finished_run(run, overrides)
    for key, value in (("output_dir", str(out)), ("resume_from_checkpoint", False), ("overwrite", False),
                       ("stop_after_epoch", None)):
        cfg[key] = value
    cfg.metric_logger.log_dir = str(Path(out) / "logs")
    state = torch.load(run.checkpoint, map_location="cpu", weights_only=False) if run.checkpoint.exists() else None
    if state is None and saved.get("epochs", 0) and saved.get("best_epoch", 0):
        raise EvaluateError(f"{run.checkpoint}: missing; the run's adapters cannot be tested again without it")

    check_config_keys(cfg, where="abmll evaluate")  # a typo'd eval key is refused, as by the recipe
    recipe = abmll_recipe.ABMLLRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    try:
        if state is not None:
            recipe.load_state(state)  # adapters (last epoch), best epoch, history, RNG state
            if adapters == "final":
                recipe.best = {"epoch": state["epoch"], "val": None, "adapters": state["adapters"]}
        else:  # nothing was trained (Pretrained, epochs=0): the adapters come from the seed
            recipe.history = saved.get("history") or []
            recipe.best = {"epoch": saved.get("best_epoch", 0), "val": saved.get("val_at_best"),
                           "adapters": recipe.adapter_state()}
        results = recipe.finish()
    finally:
        recipe.cleanup()
    if results is None:
        raise EvaluateError(f"{run_dir}: the test did not run")
    results["evaluated_from"] = {"run_dir": str(run_dir), "adapters": adapters, "overrides": list(overrides)}
    atomic_write_text(target.results, json.dumps(results, indent=2))
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="abmll evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a finished run's output_dir")
    p.add_argument("--out", type=Path, required=True, help="a new directory for the new test")
    p.add_argument("--adapters", choices=("best", "final"), default="best")
    p.add_argument("overrides", nargs="*", help="eval.* / test-data keys as key=value")
    args = p.parse_intermixed_args(argv)  # overrides may come after --out
    try:
        res = evaluate_run(args.run_dir, args.out, args.overrides, args.adapters)
    except (EvaluateError, FileNotFoundError) as err:
        print(f"abmll evaluate: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # the recipe's one-line config errors
        print(f"abmll evaluate: error: {str(err).strip().splitlines()[-1]}", file=sys.stderr)
        return 2
    m = res["test"]["mean"]
    print(f"abmll evaluate: {res['method']} on {res['split']} (seed {res['seed']}, {args.adapters} adapters, "
          f"epoch {res['best_epoch']}): accuracy {m['accuracy']:.4f} ECE {m['ece']:.4f}; wrote {args.out}/results.json")
    return 0

