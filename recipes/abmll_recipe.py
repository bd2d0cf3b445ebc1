"""Meta-train LoRA adapters with ABMLL or a baseline, and evaluate few-shot on unseen tasks.

Usage (from any directory, after ``pip install -e .``)::

    tune run abmll_recipe --config tiny/abmll
    tune run abmll_recipe --config tiny/reptile learner.epsilon=0.3 seed=2
    tune run abmll_recipe --config llama3_8b/abmll split=cls45 learner.beta=1e-7 \\
        checkpointer.checkpoint_dir=/tmp/Meta-Llama-3-8B-Instruct/original data.data_dir=...
    tune run abmll_recipe --config ./my_edited_copy.yaml

``--config`` takes a path, or a short name (``tiny/abmll``) of a YAML file shipped in
``abmll/configs``. The method is the config's ``learner._component_``
(``abmll.learners.{ABMLL,Reptile,StructuredLoRA,RegularLoRA,Pretrained}``).

Per epoch: one episode per training task (the learner decides what an episode does), then
validation on the unseen validation tasks with test-time adaptation. At the end: the test
tasks are evaluated with the adapters of the best validation epoch, ``results.json`` is
written, and the adapters are exported in PEFT's format. A checkpoint after every epoch
(adapters, optimizer states, RNG state, history) lets a stopped run resume where it stopped
(``resume_from_checkpoint=True``).
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm
from torchtune import config, modules, training, utils
from torchtune.modules.peft import get_adapter_params

from abmll.atomic import atomic_write, atomic_write_text
from abmll.config_registry import resolve_config
from abmll.data import TaskSampler, load_split, option_token_ids, task_lists_sha256
from abmll.export import save_peft_adapter
from abmll.evaluation import evaluate_unseen_tasks, num_pruned, prune_hidden_units
from abmll.modules import gaussian_lora_modules, gaussian_mode
from abmll.modules.names import clean_name

log = utils.get_logger("INFO")

CHECKPOINT_FILE = "recipe_state.pt"
RESULTS_FILE = "results.json"
KNOWN_LEARNERS = (
    "abmll.learners.ABMLL",
    "abmll.learners.Reptile",
    "abmll.learners.StructuredLoRA",
    "abmll.learners.RegularLoRA",
    "abmll.learners.Pretrained",
)
# Keys a resumed run may change without changing the trajectory it continues. Activation
# checkpointing only trades memory for recomputation (the recomputed forward replays the same
# RNG state; only floating-point rounding differs), and adapter names do not depend on it
# (abmll.modules.names), so a run may resume with it on or off.
_RESUME_MUTABLE_KEYS = (
    "epochs",
    "stop_after_epoch",
    "resume_from_checkpoint",
    "overwrite",
    "metric_logger",
    "enable_activation_checkpointing",
)


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite during training."""


class RecipeConfigError(ValueError):
    """A bad config value or path; reported as one line naming the key."""


def _instantiate(node: DictConfig, key: str, hint: str = ""):
    """``config.instantiate`` with one-line errors that name the config key."""
    if not isinstance(node, DictConfig) or "_component_" not in node:
        raise RecipeConfigError(f"{key}: expected a mapping with a _component_, got {node!r}")
    component = node.get("_component_")
    try:
        return config.instantiate(node)
    except ValueError as err:
        # Our components name their own key ("learner.beta must be ..."); keep their words.
        raise RecipeConfigError(str(err).strip().splitlines()[-1]) from None
    except Exception as err:
        # torchtune wraps import errors in InstantiationError; the cause says what failed.
        cause = err.__cause__ or err.__context__ or err
        raise RecipeConfigError(
            f"{key}._component_: cannot build {component!r} ({type(cause).__name__}: "
            f"{str(cause).strip().splitlines()[0] if str(cause).strip() else ''})"
            + (f"; {hint}" if hint else "")
        ) from None


class ABMLLRecipe:
    """Single-device meta-learning recipe. See the module docstring."""

    def __init__(self, cfg: DictConfig) -> None:
        self._device = utils.get_device(device=cfg.get("device", "cpu"))
        self._dtype = training.get_dtype(cfg.get("dtype", "fp32"), device=self._device)
        self.seed = training.set_seed(seed=cfg.get("seed", 0))
        self.epochs = int(cfg.get("epochs", 1))
        if self.epochs < 0:
            raise RecipeConfigError(f"epochs must be >= 0, got {self.epochs}")
        self.stop_after_epoch = cfg.get("stop_after_epoch", None)
        self.output_dir = Path(cfg.output_dir)
        self.ckpt_dir = self.output_dir / "checkpoints"
        ev = cfg.get("eval", {}) or {}
        self.eval_every = int(ev.get("every_n_epochs", 1))
        # validate: false skips validation; the test then uses the last epoch's adapters.
        self.validate = bool(ev.get("validate", True))
        self.num_samples = int(ev.get("num_samples", 1))
        self.eval_mode = str(ev.get("mode", "sample"))
        self.ece_bins = int(ev.get("ece_bins", 15))
        if self.eval_every < 1:
            raise RecipeConfigError(f"eval.every_n_epochs must be >= 1, got {self.eval_every}")
        if self.num_samples < 1:
            raise RecipeConfigError(f"eval.num_samples must be >= 1, got {self.num_samples}")
        if self.eval_mode not in ("sample", "mean"):
            raise RecipeConfigError(f"eval.mode must be 'sample' or 'mean', got {self.eval_mode!r}")
        if self.ece_bins < 1:
            raise RecipeConfigError(f"eval.ece_bins must be >= 1, got {self.ece_bins}")
        self.prune_fractions = [float(f) for f in (ev.get("prune_fractions", None) or [])]
        for f in self.prune_fractions:
            num_pruned(f, 1)  # validates the range, naming the key
        self.log_every = int(cfg.get("log_every_n_steps", 1))
        self.stopped_early = False  # set by stop_after_epoch
        self.cfg = cfg

    # ------------------------------------------------------------------ set-up
    def setup(self, cfg: DictConfig) -> None:
        # Everything is validated before anything is written to output_dir.
        self._resume_state = self._prepare_output_dir(cfg)
        data = cfg.data
        self.batch_size = int(data.get("batch_size", 2))
        if self.batch_size < 1:
            raise RecipeConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        self.max_eval = data.get("max_eval_examples_per_task", None)
        self._tokenizer = _instantiate(cfg.tokenizer, "tokenizer")
        data_dir = data.get("data_dir", None)
        self.split = load_split(
            str(cfg.split),
            os.path.expanduser(str(data_dir)) if data_dir is not None else None,
            split_file=data.get("split_file", None),
            # MetaICL's file naming, {task}_{k}_{seed}_{part}.jsonl (the README's data.k / data.seed).
            k=data.get("k", None),
            seed=data.get("seed", None),
        )
        chat = bool(data.get("chat_template", False))
        self.option_ids = torch.tensor(option_token_ids(self._tokenizer, chat_template=chat))
        sampler_kw = dict(
            batch_size=self.batch_size,
            max_seq_len=int(data.max_seq_len),
            seed=self.seed,
            chat_template=chat,
        )
        eval_bs = data.get("eval_batch_size", None)
        if eval_bs is not None and int(eval_bs) < 1:
            raise RecipeConfigError(f"data.eval_batch_size must be >= 1 or null, got {eval_bs}")
        self.train_sampler = TaskSampler(self.split.train, self._tokenizer, **sampler_kw)
        # Support batches stay at data.batch_size (the adaptation steps are training steps);
        # evaluation batches take data.eval_batch_size (default: data.batch_size).
        eval_kw = dict(sampler_kw, eval_batch_size=None if eval_bs is None else int(eval_bs))
        self.val_sampler = TaskSampler(self.split.val, self._tokenizer, **eval_kw)
        self.test_sampler = TaskSampler(self.split.test, self._tokenizer, **eval_kw)

        self.learner = self._instantiate_learner(cfg.learner)
        self.model = self._setup_model(cfg)
        self.learner.setup(self.model, self._device, compute_dtype=self._dtype)
        self.num_support = self.learner.inner_steps
        log.info(
            f"{type(self.learner).__name__} on split {self.split.name}: "
            f"{len(self.split.train)} training, {len(self.split.val)} validation, "
            f"{len(self.split.test)} test tasks; "
            f"{sum(p.numel() for p in self.learner.adapter_params.values()):,} adapter parameters"
        )

        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self._metric_logger = config.instantiate(cfg.metric_logger)
        self._metric_logger.log_config(cfg)

        self.start_epoch = 0
        self.global_step = 0
        self.history: List[Dict[str, Any]] = []
        self.best: Dict[str, Any] = {"epoch": None, "val": None, "adapters": None}
        if self._resume_state is not None:
            self._load_state(self._resume_state)

    def _prepare_output_dir(self, cfg: DictConfig) -> Optional[Dict[str, Any]]:
        """Refuse to overwrite a run unless asked; return the checkpoint to resume from."""
        ckpt = self.ckpt_dir / CHECKPOINT_FILE
        results = self.output_dir / RESULTS_FILE
        resume = bool(cfg.get("resume_from_checkpoint", False))
        overwrite = bool(cfg.get("overwrite", False))
        if resume:
            if ckpt.exists():
                state = torch.load(ckpt, map_location="cpu", weights_only=False)
                self._check_resume_config(cfg, state["config"])
                log.info(f"Resuming from {ckpt} (after epoch {state['epoch']})")
                return state
            log.info(f"resume_from_checkpoint=True but {ckpt} does not exist: starting from scratch")
        elif (ckpt.exists() or results.exists()) and not overwrite:
            raise RecipeConfigError(
                f"output_dir {self.output_dir} already holds a run "
                f"({results if results.exists() else ckpt}); set resume_from_checkpoint=True to "
                f"continue it, overwrite=True to replace it, or choose another output_dir"
            )
        if overwrite:
            for stale in (ckpt, results):
                stale.unlink(missing_ok=True)
        return None

    @staticmethod
    def _check_resume_config(cfg: DictConfig, saved: Dict[str, Any]) -> None:
        now = OmegaConf.to_container(cfg, resolve=True)
        for key in sorted(set(now) | set(saved)):
            if key in _RESUME_MUTABLE_KEYS:
                continue
            if now.get(key) != saved.get(key):
                raise RecipeConfigError(
                    f"resume_from_checkpoint: config key '{key}' differs from the checkpointed run "
                    f"({saved.get(key)!r} there, {now.get(key)!r} now); only "
                    f"{', '.join(_RESUME_MUTABLE_KEYS)} may change on resume"
                )

    def _instantiate_learner(self, learner_cfg: DictConfig):
        return _instantiate(learner_cfg, "learner", f"known learners: {', '.join(KNOWN_LEARNERS)}")

    def _setup_model(self, cfg: DictConfig) -> nn.Module:
        with training.set_default_dtype(self._dtype), self._device:
            model = _instantiate(cfg.model, "model")
        ckpt_cfg = cfg.get("checkpointer", None)
        if ckpt_cfg is not None:
            ckpt_dir = ckpt_cfg.get("checkpoint_dir", None)
            if ckpt_dir is not None and not Path(ckpt_dir).is_dir():
                raise RecipeConfigError(
                    f"checkpointer.checkpoint_dir: {ckpt_dir} is not a directory "
                    f"(download the weights first, e.g. with `tune download`)"
                )
            checkpointer = _instantiate(ckpt_cfg, "checkpointer")
            state = checkpointer.load_checkpoint()[training.MODEL_KEY]
            adapter_keys = set(get_adapter_params(model))
            missing, unexpected = model.load_state_dict(state, strict=False)
            bad_missing = sorted(set(missing) - adapter_keys)
            if bad_missing or unexpected:
                raise RecipeConfigError(
                    f"checkpointer: weights do not fit model._component_ "
                    f"(missing {bad_missing[:5]}, unexpected {list(unexpected)[:5]})"
                )
            del state
        if cfg.get("enable_activation_checkpointing", False):
            training.set_activation_checkpointing(
                model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
            )
        return model

    # ------------------------------------------------------------------ state
    def _adapter_state(self) -> Dict[str, torch.Tensor]:
        # Keyed by clean names (no activation checkpointing prefix): see abmll.modules.names.
        return {k: p.detach().cpu().clone() for k, p in self.learner.adapter_params.items()}

    @torch.no_grad()
    def _load_adapters(self, state: Dict[str, torch.Tensor]) -> None:
        # Checkpoints written before adapter names were cleaned carry the wrapper's prefix.
        state = {clean_name(k): v for k, v in state.items()}
        missing = [k for k in self.learner.adapter_params if k not in state]
        if missing:
            raise RecipeConfigError(
                f"resume_from_checkpoint: the checkpoint has no adapter {missing[0]!r} "
                f"({len(missing)} of {len(self.learner.adapter_params)} missing); it was written "
                f"for another model._component_ or lora_attn_modules"
            )
        for k, p in self.learner.adapter_params.items():
            p.copy_(state[k].to(p.device, p.dtype))

    def _load_state(self, state: Dict[str, Any]) -> None:
        self._load_adapters(state["adapters"])
        self.learner.load_state_dict(state["learner"])
        self.start_epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history = state["history"]
        self.best = state["best"]
        torch.set_rng_state(state["rng"]["torch"])
        if torch.cuda.is_available() and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def save_checkpoint(self, epoch: int) -> None:
        """Everything needed to continue after ``epoch`` exactly as if never stopped."""
        state = {
            "epoch": epoch,
            "global_step": self.global_step,
            "adapters": self._adapter_state(),
            "learner": self.learner.state_dict(),
            "history": self.history,
            "best": self.best,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }
        atomic_write(self.ckpt_dir / CHECKPOINT_FILE, lambda tmp: torch.save(state, tmp))

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, sampler: TaskSampler, desc: str) -> Dict[str, Any]:
        with gaussian_mode(self.model, self.eval_mode):
            return evaluate_unseen_tasks(
                self.learner,
                sampler,
                self.option_ids,
                num_support=self.num_support,
                max_eval_examples=self.max_eval,
                num_samples=self.num_samples if self.eval_mode == "sample" else 1,
                n_bins=self.ece_bins,
                desc=desc,
            )

    def _log_eval(self, prefix: str, result: Dict[str, Any], epoch: int) -> None:
        metrics = {f"{prefix}/{k}": v for k, v in result["mean"].items()}
        self._metric_logger.log_dict(metrics, step=self.global_step)
        log.info(
            f"epoch {epoch} {prefix}: accuracy {result['mean']['accuracy']:.4f} "
            f"ece {result['mean']['ece']:.4f} nll {result['mean']['nll']:.4f}"
        )

    # ------------------------------------------------------------------ training
    def _validate(self, epoch: int) -> Optional[Dict[str, float]]:
        """Validate (when enabled) and keep the adapters of the best epoch so far."""
        if not self.validate:
            self.best = {"epoch": epoch, "val": None, "adapters": self._adapter_state()}
            return None
        val = self.evaluate(self.val_sampler, f"val epoch {epoch}")
        self._log_eval("val", val, epoch)
        if self.best["epoch"] is None or val["mean"]["accuracy"] > self.best["val"]["accuracy"]:
            self.best = {"epoch": epoch, "val": val["mean"], "adapters": self._adapter_state()}
        return val["mean"]

    def _check_finite(self, metrics: Dict[str, float], episode, epoch: int) -> None:
        """Stop at the first non-finite loss term, naming it: training on would only spread
        NaNs into the adapters, and the last checkpoint (end of the previous epoch) stays good."""
        # Without query batches ABMLL reports no query NLL (NaN by construction, not a failure).
        optional = {"query_nll", "outer_loss"} if not episode.query else set()
        bad = [k for k, v in metrics.items() if k not in optional and not math.isfinite(v)]
        if bad:
            ckpt = self.ckpt_dir / CHECKPOINT_FILE
            kept = f"the last good checkpoint {ckpt} is kept" if ckpt.exists() else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"non-finite {', '.join(f'{k}={metrics[k]}' for k in bad)} at step {self.global_step + 1} "
                f"(epoch {epoch}, task {episode.task!r}); {kept}. Lower the learning rates "
                f"(learner.*lr) or learner.beta and resume with resume_from_checkpoint=True"
            )

    def train(self) -> None:
        n_episodes = self.learner.num_episodes(self.train_sampler)
        if (n_episodes == 0 or self.epochs == 0) and self.best["epoch"] is None:
            # Nothing to train (Pretrained, or epochs=0): the model as it is, as epoch 0.
            val = self._validate(0)
            self.history.append({"epoch": 0, "val": val} if val else {"epoch": 0})
            return
        for epoch in range(self.start_epoch + 1, self.epochs + 1):
            self.model.train()
            sums: Dict[str, float] = {}
            pbar = tqdm(
                self.learner.episodes(self.train_sampler, epoch, self.seed),
                total=n_episodes,
                desc=f"epoch {epoch}/{self.epochs}",
            )
            for episode in pbar:
                t0 = time.perf_counter()
                metrics = self.learner.train_episode(episode)
                self._check_finite(metrics, episode, epoch)
                metrics["tokens_per_second"] = episode.num_tokens / (time.perf_counter() - t0)
                self.global_step += 1
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
                if self.global_step % self.log_every == 0:
                    if self._device.type == "cuda":
                        metrics.update(training.get_memory_stats(device=self._device))
                    self._metric_logger.log_dict(
                        {f"train/{k}": v for k, v in metrics.items()}, step=self.global_step
                    )
                pbar.set_postfix(nll=f"{metrics.get('inner_nll', float('nan')):.3f}")
            record: Dict[str, Any] = {
                "epoch": epoch,
                "train": {k: v / max(n_episodes, 1) for k, v in sums.items()},
            }
            if epoch % self.eval_every == 0 or epoch == self.epochs:
                val = self._validate(epoch)
                if val is not None:
                    record["val"] = val
            self.history.append(record)
            self.save_checkpoint(epoch)
            if self.stop_after_epoch is not None and epoch >= int(self.stop_after_epoch):
                log.info(f"stop_after_epoch={self.stop_after_epoch}: stopping; resume with resume_from_checkpoint=True")
                self.stopped_early = True
                return

    # ------------------------------------------------------------------ test and report
    def finish(self) -> Optional[Dict[str, Any]]:
        """Test the best epoch's adapters, then the optional steps (pruning, PEFT export).

        ``results.json`` is written as soon as the test is measured and rewritten after each
        optional step, so a failing optional step cannot lose what was measured before it:
        the failure is logged, recorded under ``errors`` and turns the exit status non-zero
        (``self.errors``), and the remaining steps still run.
        """
        if self.stopped_early:
            return None
        self.errors: Dict[str, str] = {}
        final_adapters = self._adapter_state()
        self._load_adapters(self.best["adapters"])
        test = self.evaluate(self.test_sampler, "test")
        self._log_eval("test", test, self.best["epoch"])
        self._results = self._results_dict(test)
        self._write_results()
        log.info(
            f"test (best epoch {self.best['epoch']}): accuracy {test['mean']['accuracy']:.4f} "
            f"ece {test['mean']['ece']:.4f}; wrote {self.output_dir / RESULTS_FILE}"
        )
        if self.prune_fractions:
            self._optional_step("pruning", self._evaluate_pruning)
        if self.learner.adapter_kind is not None:
            self._optional_step("export", lambda: self._export_adapters(final_adapters))
        return self._results

    def _results_dict(self, test: Dict[str, Any]) -> Dict[str, Any]:
        return {
            "method": self.learner.method_name,
            "learner": self.cfg.learner.get("_component_"),
            "split": self.split.name,
            # Which tasks, not only the split's name: a data.split_file can reuse a name.
            "split_file": self.cfg.data.get("split_file", None),
            "task_lists_sha256": task_lists_sha256(self.split),
            "seed": self.seed,
            "best_epoch": self.best["epoch"],
            "epochs": self.epochs,
            "val_at_best": self.best["val"],
            "test": {"mean": test["mean"], "pooled": test["pooled"], "per_task": test["per_task"]},
            "pruning": {},
            "history": self.history,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            # The test is measured: the run's result is final even if an optional step fails.
            "finished": True,
            "errors": self.errors,
        }

    def _write_results(self) -> None:
        atomic_write_text(self.output_dir / RESULTS_FILE, json.dumps(self._results, indent=2))

    def _optional_step(self, name: str, step) -> None:
        """Run ``step``; on failure log it and record it in results.json instead of raising."""
        try:
            step()
        except Exception as err:  # noqa: BLE001 - any failure here must not lose the results
            log.exception(f"{name} failed; {self.output_dir / RESULTS_FILE} keeps the test results")
            self.errors[name] = f"{type(err).__name__}: {str(err).strip()}"
            self._write_results()

    def _evaluate_pruning(self) -> None:
        for fraction in self.prune_fractions:
            # The whole test evaluation (adaptation and prediction) runs on the pruned model.
            with prune_hidden_units(self.model, fraction):
                pruned = self.evaluate(self.test_sampler, f"test pruned {fraction:g}")
            self._results["pruning"][f"{fraction:g}"] = pruned["mean"]
            self._log_eval(f"test_pruned_{fraction:g}", pruned, self.best["epoch"])
            self._write_results()  # each finished fraction is kept even if a later one fails

    def _export_adapters(self, final_adapters: Dict[str, torch.Tensor]) -> None:
        self._export_peft(self.output_dir / "adapter_best")  # the best adapters are loaded
        self._load_adapters(final_adapters)
        self._export_peft(self.output_dir / "adapter_final")

    def _export_peft(self, out_dir: Path) -> None:
        """The (global mean) adapter as a PEFT LoRA: adapter_config.json + adapter_model.safetensors."""
        layer = next(m for m in self.model.modules() if hasattr(m, "rank") and hasattr(m, "alpha"))
        save_peft_adapter(
            self.learner.export_adapter(),
            self.model,
            out_dir,
            rank=layer.rank,
            alpha=layer.alpha,
            base_model_name_or_path=self.cfg.get("base_model_name_or_path", None),
        )

    def cleanup(self) -> None:
        self._metric_logger.close()
        del self.model
        gc.collect()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _is_finished(cfg: DictConfig) -> bool:
    """A resumed run whose results.json exists has nothing left to do, unless an optional step
    (pruning, export) failed: then resuming redoes the end of the run from the last checkpoint."""
    results = Path(cfg.output_dir) / RESULTS_FILE
    if not (results.exists() and bool(cfg.get("resume_from_checkpoint", False))):
        return False
    try:
        return not json.loads(results.read_text()).get("errors")
    except (OSError, ValueError, AttributeError):
        return True  # unreadable: leave it for the user rather than overwrite it


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    if _is_finished(cfg):
        log.info(f"{Path(cfg.output_dir) / RESULTS_FILE} exists: this run has finished, nothing to do")
        return
    try:
        recipe = ABMLLRecipe(cfg=cfg)
        recipe.setup(cfg=cfg)
    except (RecipeConfigError, ValueError, FileNotFoundError) as err:
        print(f"abmll_recipe: error: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        recipe.train()
    except NonFiniteLossError as err:
        print(f"abmll_recipe: error: {err}", file=sys.stderr)
        recipe.cleanup()
        sys.exit(1)
    results = recipe.finish()
    recipe.cleanup()
    if results and results["errors"]:
        # An optional step failed after the test was measured: the results are kept, but the
        # run did not do all it was asked to, and a script or sweep must be able to tell.
        failed = "; ".join(f"{k} failed ({v.splitlines()[0]})" for k, v in results["errors"].items())
        print(
            f"abmll_recipe: error: {failed}; {Path(cfg.output_dir) / RESULTS_FILE} keeps the test "
            f"results (resume_from_checkpoint=True redoes the end of the run)",
            file=sys.stderr,
        )
        sys.exit(1)


def _resolve_config_arg(argv: List[str]) -> List[str]:
    """Map ``--config tiny/abmll`` to the YAML shipped in ``abmll/configs`` unless it is a path."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        value = None
        if arg == "--config" and i + 1 < len(argv):
            idx, value = i + 1, argv[i + 1]
        elif arg.startswith("--config="):
            idx, value = i, arg.split("=", 1)[1]
        if value is None:
            continue
        try:
            resolved = str(resolve_config(value))
        except FileNotFoundError as err:
            print(f"abmll_recipe: error: {err}", file=sys.stderr)
            sys.exit(2)
        argv[idx] = resolved if arg == "--config" else f"--config={resolved}"
    return argv


if __name__ == "__main__":
    sys.argv = _resolve_config_arg(sys.argv)
    sys.exit(recipe_main())
