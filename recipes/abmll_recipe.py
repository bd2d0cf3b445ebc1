"""Meta-train LoRA adapters with ABMLL or a baseline, and evaluate few-shot on unseen tasks.

Usage (from any directory, after ``pip install -e .``)::

    tune run abmll_recipe --config tiny/abmll
    tune run abmll_recipe --config tiny/reptile learner.epsilon=0.3 seed=2
    tune run abmll_recipe --config llama3_8b/abmll split=cls45 learner.beta=1e-7 \\
        checkpointer.checkpoint_dir=/tmp/Meta-Llama-3-8B-Instruct/original data.data_dir=...
    abmll cp llama3_8b/abmll ./mine.yaml && tune run abmll_recipe --config ./mine.yaml

``--config`` takes a path, or a short name (``tiny/abmll``, ``abmll ls`` lists them) of a YAML
file shipped in ``abmll/configs``. The method is the config's ``learner._component_``
(``abmll.learners.{ABMLL,Reptile,StructuredLoRA,RegularLoRA,Pretrained}``).

Per epoch: one episode per training task (the learner decides what an episode does), then
validation on the unseen validation tasks with test-time adaptation. At the end: the test
tasks are evaluated with the adapters of the best validation epoch, ``results.json`` is
written, and the adapters are exported in PEFT's format. A checkpoint after every epoch
(adapters, optimizer states, RNG state, history) lets a stopped run resume where it stopped
(``resume_from_checkpoint=True``).

What a run leaves on disk (file names, the results record, when an output_dir may be reused)
is ``abmll.run_contract``'s, shared with the reproduce scripts and the reporting. With
``tune run --nproc_per_node N`` each process trains its share of every meta-batch's tasks
(``learner.meta_batch_size``) and evaluates its share of the unseen tasks; ``abmll.distributed``
holds the collectives, and process 0 alone writes. The recipe is about 500 lines because, as in
torchtune, it is standalone and reads top to bottom: set-up, the epoch loop, validation, the end
of the run, and the points where the processes meet.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
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

from abmll.compiling import compile_model
from abmll.config_keys import check_config_keys
from abmll.config_registry import RecipeConfigError, fill_builder_default, instantiate, resolve_config_arg
from abmll.data import TaskSampler, load_split, option_token_ids, summarize_prompt_lengths, task_lists_sha256
from abmll.export import save_peft_adapter
from abmll.evaluation import (
    evaluate_unseen_tasks,
    sample_counts,
    num_pruned,
    posterior_summary,
    prune_hidden_units,
    write_predictions,
)
from abmll.modules import gaussian_mode, set_c_from_base_weights
from abmll.modules.names import clean_name
from abmll.distributed import Replicas, seed_of
from abmll.precision import resolve_precision
from abmll.run_contract import (
    KNOWN_LEARNERS,
    RunDir,
    prepare_output_dir,
    recorded_method,
    results_record,
    write_checkpoint,
)

log = utils.get_logger("INFO")


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite during training."""


class ABMLLRecipe:
    """Meta-learning recipe, one device per process. See the module docstring."""

    def __init__(self, cfg: DictConfig) -> None:
        # A Gaussian model's estimator is recorded even where the config leaves it to the
        # builder, so that results.json and the checkpoint say which one trained the run
        # (a config without the key is read as the pre-note-30 default, local).
        fill_builder_default(cfg.get("model"), "sampling")
        self._device = utils.get_device(device=cfg.get("device", "cpu"))
        # One process, or one of --nproc_per_node N (torchrun): abmll.distributed.
        self.replicas = Replicas.from_environment(self._device)
        if not self.replicas.is_main:  # one process reports (a filter: get_logger resets levels)
            log.addFilter(lambda record: record.levelno >= logging.WARNING)
        # dtype: auto -> bf16 only where the hardware computes it natively (abmll.precision).
        # Process 0 decides, so that a timing probe cannot make the processes disagree.
        self.precision = self.replicas.all_gather(
            _resolve_or_error(cfg.get("dtype", "fp32"), self._device) if self.replicas.is_main else None
        )[0]
        if isinstance(self.precision, str):  # every process stops with process 0's message
            raise RecipeConfigError(self.precision)
        self.seed = training.set_seed(seed=cfg.get("seed", 0))
        if self.replicas.world_size > 1:
            # torchtune seeds process r with seed + r; the model's random parts (a random base
            # model, the adapters' initial values) must be the same in every process, and are
            # then the same as in a one-process run.
            torch.manual_seed(self.seed)
        self.epochs = int(cfg.get("epochs", 1))
        if self.epochs < 0:
            raise RecipeConfigError(f"epochs must be >= 0, got {self.epochs}")
        self.stop_after_epoch = cfg.get("stop_after_epoch", None)
        self.output_dir = Path(cfg.output_dir)
        self.run = RunDir(self.output_dir)  # file layout: abmll.run_contract
        ev = cfg.get("eval", {}) or {}
        self.eval_every = int(ev.get("every_n_epochs", 1))
        # validate: false skips validation; the test then uses the last epoch's adapters.
        self.validate = bool(ev.get("validate", True))
        # An int, or a list (a curve over sample counts from prefixes of the same draws; the
        # headline metrics use the largest).
        self.num_samples = ev.get("num_samples", 1)
        try:
            sample_counts(self.num_samples)  # checked here, before anything is written
        except ValueError as err:
            raise RecipeConfigError(str(err)) from None
        self.eval_mode = str(ev.get("mode", "sample"))
        self.ece_bins = int(ev.get("ece_bins", 15))
        # Test-time uncertainty controls (docs/uncertainty.md): the flip rate between one
        # sample and the mean mode (Gaussian models in sample mode), and a temperature per task
        # fitted on its support examples. Validation writes its predictions only when asked.
        self.flip_rate = bool(ev.get("flip_rate", True))
        self.temperature_scaling = bool(ev.get("temperature_scaling", True))
        self.save_val_predictions = bool(ev.get("save_predictions", False))
        if self.eval_every < 1:
            raise RecipeConfigError(f"eval.every_n_epochs must be >= 1, got {self.eval_every}")
        if self.eval_mode not in ("sample", "mean"):
            raise RecipeConfigError(f"eval.mode must be 'sample' or 'mean', got {self.eval_mode!r}")
        if self.ece_bins < 1:
            raise RecipeConfigError(f"eval.ece_bins must be >= 1, got {self.ece_bins}")
        self.prune_fractions = [float(f) for f in (ev.get("prune_fractions", None) or [])]
        for f in self.prune_fractions:
            num_pruned(f, 1)  # validates the range, naming the key
        self.log_every = int(cfg.get("log_every_n_steps", 1))
        # As in torchtune's recipes: cut each epoch after this many (meta-)steps (timing, debugging).
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch", None)
        if self.max_steps_per_epoch is not None and int(self.max_steps_per_epoch) < 1:
            raise RecipeConfigError(f"max_steps_per_epoch must be >= 1 or null, got {self.max_steps_per_epoch}")
        # Debugging: after every step, check that all processes hold the same adapters.
        self.check_replicas = bool(cfg.get("debug_check_replicas", False))
        # compile: torch.compile each transformer layer, as torchtune's recipes do (a speed
        # option, off by default; the numbers are eager's up to rounding: abmll.compiling).
        self.compile = cfg.get("compile", False)
        if not isinstance(self.compile, bool):
            raise RecipeConfigError(f"config key 'compile' must be true or false, got {self.compile!r}")
        self.stopped_early = False  # set by stop_after_epoch
        self._resume_state = None  # set by setup()
        self._metric_logger = None  # set by setup() (process 0)
        self.cfg = cfg

    # ------------------------------------------------------------------ set-up
    def setup(self, cfg: DictConfig) -> None:
        # Everything is validated before anything is written to output_dir. Process 0 decides
        # (and removes what overwrite=True replaces) before the others look.
        for turn in (True, False):
            if self.replicas.is_main == turn:
                self._resume_state = prepare_output_dir(
                    self.run,
                    OmegaConf.to_container(cfg, resolve=True),
                    resume=bool(cfg.get("resume_from_checkpoint", False)),
                    overwrite=bool(cfg.get("overwrite", False)) and self.replicas.is_main,
                    log=log.info,
                )
            self.replicas.barrier()
        self._setup_tokenizer(cfg)
        data = cfg.data
        self.max_eval = data.get("max_eval_examples_per_task", None)
        data_dir = data.get("data_dir", None)
        self.split = load_split(
            str(cfg.split),
            os.path.expanduser(str(data_dir)) if data_dir is not None else None,
            split_file=data.get("split_file", None),
            # MetaICL's file naming, {task}_{k}_{seed}_{part}.jsonl (the README's data.k / data.seed).
            k=data.get("k", None),
            seed=data.get("seed", None),
        )
        self.train_sampler = TaskSampler(self.split.train, self._tokenizer, **self.sampler_kw)
        self.val_sampler = TaskSampler(self.split.val, self._tokenizer, **self.eval_sampler_kw)
        self.test_sampler = TaskSampler(self.split.test, self._tokenizer, **self.eval_sampler_kw)
        self._setup_learner(cfg)
        for sampler in (self.val_sampler, self.test_sampler):  # before anything is trained
            sampler.check_demonstration_pools(self.num_support)
        log.info(
            f"{type(self.learner).__name__} on split {self.split.name}: "
            f"{len(self.split.train)} training, {len(self.split.val)} validation, "
            f"{len(self.split.test)} test tasks; "
            f"{sum(p.numel() for p in self.learner.adapter_params.values()):,} adapter parameters"
        )

        self._metric_logger = None
        if self.replicas.is_main:
            self.run.checkpoints.mkdir(parents=True, exist_ok=True)
            self._metric_logger = config.instantiate(cfg.metric_logger)
            self._metric_logger.log_config(cfg)

        self.start_epoch = 0
        self.global_step = 0
        self.history: List[Dict[str, Any]] = []
        self.best: Dict[str, Any] = {"epoch": None, "val": None, "adapters": None}
        if self._resume_state is not None:
            self.load_state(self._resume_state)

    def setup_for_adaptation(self, cfg: DictConfig) -> None:
        """What test-time adaptation needs and no more (``abmll adapt``): the dtype, tokenizer
        and batching, the model with its base weights, and the learner. No split is loaded and
        nothing is written."""
        self._setup_tokenizer(cfg)
        self._setup_learner(cfg)

    @property
    def tokenizer(self):
        """The run's tokenizer (after set-up)."""
        return self._tokenizer

    def _setup_tokenizer(self, cfg: DictConfig) -> None:
        """The compute dtype, the tokenizer, the answer letters' token ids, and how examples
        are tokenized and batched (``sampler_kw`` / ``eval_sampler_kw``)."""
        self._dtype = self._choose_dtype()
        data = cfg.data
        self.batch_size = int(data.get("batch_size", 2))
        if self.batch_size < 1:
            raise RecipeConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        self._tokenizer = instantiate(cfg.tokenizer, "tokenizer")
        chat = bool(data.get("chat_template", False))
        self.option_ids = torch.tensor(option_token_ids(self._tokenizer, chat_template=chat))
        eval_bs = data.get("eval_batch_size", None)
        if eval_bs is not None and int(eval_bs) < 1:
            raise RecipeConfigError(f"data.eval_batch_size must be >= 1 or null, got {eval_bs}")
        k = data.get("num_demonstrations", 0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise RecipeConfigError(f"data.num_demonstrations must be an integer >= 0, got {k!r}")
        self.num_demonstrations = k
        self.sampler_kw = dict(
            batch_size=self.batch_size,
            max_seq_len=int(data.max_seq_len),
            seed=self.seed,
            chat_template=chat,
            # In-context demonstrations (abmll/data/sampling.py): a training task's prompts take
            # them from the task's own examples, i.e. its training file.
            num_demonstrations=k,
            demonstration_pool="task",
        )
        # Support batches stay at data.batch_size (the adaptation steps are training steps);
        # evaluation batches take data.eval_batch_size (default: data.batch_size). An unseen
        # task's prompts take their demonstrations from its support examples, the labelled
        # few-shot set test-time adaptation is given: never from an example that is evaluated.
        self.eval_sampler_kw = dict(
            self.sampler_kw,
            eval_batch_size=None if eval_bs is None else int(eval_bs),
            demonstration_pool="support",
        )

    def _setup_learner(self, cfg: DictConfig) -> None:
        self.learner = self._instantiate_learner(cfg.learner)
        m, w = self.learner.meta_batch_size, self.replicas.world_size
        # Beyond the paper's setting (one task per step, one process), each task draws its
        # noise from its own seed, so a task's numbers do not depend on which process runs it.
        self.per_task_rng = m > 1 or w > 1
        self.model = self._setup_model(cfg)
        self.learner.setup(self.model, self._device, compute_dtype=self._dtype, replicas=self.replicas)
        if self.compile:  # after the learner's set-up: the adapters and their flags are in place
            compile_model(self.model, verbose=self.replicas.is_main)
        self.num_support = self.learner.inner_steps

    def _choose_dtype(self) -> torch.dtype:
        """The resolved compute dtype, logged; a resumed ``dtype: auto`` run keeps its checkpoint's
        (a run moved to another kind of CPU continues the same computation, only slower)."""
        saved = (self._resume_state or {}).get("precision")
        if saved and self.precision.requested == "auto" and saved["dtype"] != self.precision.name:
            self.precision = dataclasses.replace(
                self.precision,
                dtype=training.get_dtype(saved["dtype"], device=self._device),
                reason=f"the resumed run's dtype (this machine alone would choose {self.precision.name}: "
                f"{self.precision.reason})",
            )
        log.info(f"{self.precision.describe()}; CPU capability {self.precision.cpu_capability}, "
                 f"{self.precision.threads} threads")
        if self.precision.slow_bf16:
            log.warning(self.precision.slow_bf16_warning())
        return self.precision.dtype

    def _instantiate_learner(self, learner_cfg: DictConfig):
        return instantiate(learner_cfg, "learner", f"known learners: {', '.join(KNOWN_LEARNERS)}")

    def _setup_model(self, cfg: DictConfig) -> nn.Module:
        with training.set_default_dtype(self._dtype), self._device:
            model = instantiate(cfg.model, "model")
        ckpt_cfg = cfg.get("checkpointer", None)
        if ckpt_cfg is not None:
            ckpt_dir = ckpt_cfg.get("checkpoint_dir", None)
            if ckpt_dir is not None and not Path(ckpt_dir).is_dir():
                raise RecipeConfigError(
                    f"checkpointer.checkpoint_dir: {ckpt_dir} is not a directory "
                    f"(download the weights first, e.g. with `tune download`)"
                )
            checkpointer = instantiate(ckpt_cfg, "checkpointer")
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
        relative_std = cfg.get("c_relative_std", None)
        if relative_std is not None:
            # c per layer from the spread of its base weights (docs/notes.md, note 24); after the
            # weights are loaded, and again identically on resume (c is not a parameter).
            try:
                cs = set_c_from_base_weights(model, float(relative_std))
            except ValueError as err:
                raise RecipeConfigError(str(err)) from None
            if cs:
                log.info(f"c from the base weights (c_relative_std={relative_std}): {min(cs.values()):.2f} to "
                         f"{max(cs.values()):.2f} over {len(cs)} layers, in place of model.c")
            else:
                log.info("c_relative_std: the model has no Gaussian LoRA layers; nothing to set")
        if cfg.get("enable_activation_checkpointing", False):
            training.set_activation_checkpointing(
                model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
            )
        return model

    # ------------------------------------------------------------------ state
    def adapter_state(self) -> Dict[str, torch.Tensor]:
        # Keyed by clean names (no activation checkpointing prefix): see abmll.modules.names.
        return {k: p.detach().cpu().clone() for k, p in self.learner.adapter_params.items()}

    @torch.no_grad()
    def load_adapters(self, state: Dict[str, torch.Tensor]) -> None:
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

    def load_state(self, state: Dict[str, Any]) -> None:
        self.load_adapters(state["adapters"])
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
            "adapters": self.adapter_state(),
            "learner": self.learner.state_dict(),
            "history": self.history,
            "best": self.best,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "precision": self.precision.record(),
        }
        if self.replicas.is_main:  # the state is the same on every process
            write_checkpoint(self.run, state)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, sampler: TaskSampler, desc: str, *, test: bool = False, predictions: bool = False) -> Dict[str, Any]:
        """Test-time adaptation and prediction on every task of ``sampler``. ``test``: also the
        uncertainty controls (flip rate, temperature scaling); ``predictions``: keep one row
        per example."""
        sampled = self.eval_mode == "sample"
        gaussian = self.learner.adapter_kind == "gaussian"
        with gaussian_mode(self.model, self.eval_mode):
            return evaluate_unseen_tasks(
                self.learner,
                sampler,
                self.option_ids,
                num_support=self.num_support,
                max_eval_examples=self.max_eval,
                num_samples=self.num_samples if sampled else 1,
                n_bins=self.ece_bins,
                desc=desc,
                replicas=self.replicas,
                seed=self.seed if self.per_task_rng else None,
                flip_rate=test and self.flip_rate and sampled and gaussian,
                temperature_scaling=test and self.temperature_scaling,
                keep_predictions=predictions,
            )

    def _write_predictions(self, result: Dict[str, Any], which: str) -> None:
        if self.replicas.is_main and "predictions" in result:
            path = write_predictions(result["predictions"], self.run.predictions(which))
            log.info(f"wrote {len(result['predictions'])} predictions to {path}")

    def _log_metrics(self, metrics: Dict[str, float]) -> None:
        if self._metric_logger is not None:
            self._metric_logger.log_dict(metrics, step=self.global_step)

    def _log_eval(self, prefix: str, result: Dict[str, Any], epoch: int) -> None:
        self._log_metrics({f"{prefix}/{k}": v for k, v in result["mean"].items()})
        log.info(
            f"epoch {epoch} {prefix}: accuracy {result['mean']['accuracy']:.4f} "
            f"ece {result['mean']['ece']:.4f} nll {result['mean']['nll']:.4f}"
        )

    # ------------------------------------------------------------------ training
    def _validate(self, epoch: int) -> Optional[Dict[str, float]]:
        """Validate (when enabled) and keep the adapters of the best epoch so far."""
        if not self.validate:
            self.best = {"epoch": epoch, "val": None, "adapters": self.adapter_state()}
            return None
        val = self.evaluate(self.val_sampler, f"val epoch {epoch}", predictions=self.save_val_predictions)
        self._write_predictions(val, f"val_epoch{epoch}")
        self._log_eval("val", val, epoch)
        if self.best["epoch"] is None or val["mean"]["accuracy"] > self.best["val"]["accuracy"]:
            self.best = {"epoch": epoch, "val": val["mean"], "adapters": self.adapter_state()}
        return val["mean"]

    def _check_finite(self, metrics: Dict[str, float], tasks: List[Any], epoch: int) -> None:
        """Stop at the first non-finite loss term, naming it: training on would only spread
        NaNs into the adapters, and the last checkpoint (end of the previous epoch) stays good.
        The metrics are the meta-batch's (the same on every process), so all processes stop."""
        optional = self.learner.metrics_nan_by_construction()  # the learner's own to name
        bad = [k for k, v in metrics.items() if k not in optional and not math.isfinite(v)]
        if bad:
            ckpt = self.run.checkpoint
            kept = f"the last good checkpoint {ckpt} is kept" if ckpt.exists() else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"non-finite {', '.join(f'{k}={metrics[k]}' for k in bad)} at step {self.global_step + 1} "
                f"(epoch {epoch}, task {', '.join(map(repr, tasks))}); {kept}. Lower the learning rates "
                f"(learner.*lr) or learner.beta and resume with resume_from_checkpoint=True"
            )

    def _meta_batches(self, epoch: int) -> List[List[Any]]:
        """The epoch's episode keys (tasks), ``meta_batch_size`` per step, in the seeded order."""
        keys = self.learner.episode_keys(self.train_sampler, epoch, self.seed)
        m = self.learner.meta_batch_size
        groups = [keys[i : i + m] for i in range(0, len(keys), m)]
        return groups if self.max_steps_per_epoch is None else groups[: int(self.max_steps_per_epoch)]

    def _episode(self, key: Any, epoch: int):
        episode = self.learner.make_episode(self.train_sampler, key, epoch)
        if self.per_task_rng:
            episode.seed = seed_of(self.seed, "train", epoch, key)
        return episode

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
            started = time.perf_counter()
            groups = self._meta_batches(epoch)
            pbar = tqdm(groups, desc=f"epoch {epoch}/{self.epochs}", disable=not self.replicas.is_main)
            for group in pbar:
                # This process builds and trains only its share of the meta-batch's tasks.
                episodes = [self._episode(key, epoch) for key in self.replicas.shard(group)]
                t0 = time.perf_counter()
                metrics = self.learner.train_meta_batch(episodes, len(group))
                self._check_finite(metrics, group, epoch)
                # This process's throughput (the run's is about world_size times it).
                tokens = sum(e.num_tokens for e in episodes)
                metrics["tokens_per_second"] = tokens / (time.perf_counter() - t0)
                self.global_step += 1
                if self.check_replicas:
                    self.replicas.check_identical(self.learner.adapter_params, f"step {self.global_step}")
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
                if self.global_step % self.log_every == 0:
                    if self._device.type == "cuda":
                        metrics.update(training.get_memory_stats(device=self._device))
                    self._log_metrics({f"train/{k}": v for k, v in metrics.items()})
                pbar.set_postfix(nll=f"{metrics.get('inner_nll', float('nan')):.3f}")
            train = {k: v / max(len(groups), 1) for k, v in sums.items()}
            train["seconds"] = time.perf_counter() - started  # the epoch's wall-clock training time
            record: Dict[str, Any] = {"epoch": epoch, "train": train}
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
        final_adapters = self.adapter_state()
        self.load_adapters(self.best["adapters"])
        started = time.perf_counter()
        test = self.evaluate(self.test_sampler, "test", test=True, predictions=True)
        self._data = self._data_record(test_seconds=time.perf_counter() - started)
        self._log_eval("test", test, self.best["epoch"])
        self._write_predictions(test, "test")
        self._results = self._results_dict(test)
        self._write_results()
        log.info(
            f"test (best epoch {self.best['epoch']}): accuracy {test['mean']['accuracy']:.4f} "
            f"ece {test['mean']['ece']:.4f}; wrote {self.run.results}"
        )
        if self.prune_fractions:
            self._optional_step("pruning", self._evaluate_pruning)
        if self.learner.adapter_kind is not None and self.replicas.is_main:
            self._optional_step("export", lambda: self._export_adapters(final_adapters))
        return self._results

    def _data_record(self, test_seconds: float) -> Dict[str, Any]:
        """results.json's ``data``: the demonstrations, and what the test cost: its prompts in
        tokens (every process's tasks: a collective, called by all) and its wall-clock seconds
        (the training's are in ``history``)."""
        lengths = {}
        for part in self.replicas.all_gather(self.test_sampler.prompt_lengths()):
            lengths.update(part)
        lengths = {t: lengths[t] for t in self.test_sampler.task_names if t in lengths}
        k = self.num_demonstrations
        return {
            "num_demonstrations": k,
            "demonstrations_from": {
                "training tasks": "the task's examples (its training file), never the example itself",
                "unseen tasks": "the task's support examples (learner.inner_steps x data.batch_size, "
                "the test-time adaptation set), never an evaluated example",
            } if k else None,
            "test_prompts": summarize_prompt_lengths(lengths, k),
            # Adaptation, prediction, the + TS fit and the flip forward, on this machine
            # (precision.cpu_capability, precision.threads): a run's time, not a benchmark.
            "test_seconds": test_seconds,
        }

    def _results_dict(self, test: Dict[str, Any]) -> Dict[str, Any]:
        return results_record(
            method=recorded_method(self.learner.method_name, self.num_demonstrations),
            learner=self.cfg.learner.get("_component_"),
            split=self.split.name,
            split_file=self.cfg.data.get("split_file", None),
            task_lists_sha256=task_lists_sha256(self.split),
            seed=self.seed,
            best_epoch=self.best["epoch"],
            epochs=self.epochs,
            val_at_best=self.best["val"],
            test=test,
            posterior=self._posterior(test),
            predictions=self.run.predictions("test").name,
            history=self.history,
            config=OmegaConf.to_container(self.cfg, resolve=True),
            precision=self.precision.record(),
            errors=self.errors,
            data=self._data,
        )

    def _posterior(self, test: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """What the learned variances are (the loaded best adapters), and how often a sample's
        answer differs from the mean mode's on the test examples (None: no Gaussian layers)."""
        summary = posterior_summary(self.model)
        if summary is not None:
            summary["flip"] = test.get("flip")  # None when not measured (mean mode, or turned off)
        return summary

    def _write_results(self) -> None:
        if self.replicas.is_main:
            self.run.write_results(self._results)

    def _optional_step(self, name: str, step) -> None:
        """Run ``step``; on failure log it and record it in results.json instead of raising."""
        try:
            step()
        except Exception as err:  # noqa: BLE001 - any failure here must not lose the results
            log.exception(f"{name} failed; {self.run.results} keeps the test results")
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
        self._export_peft(self.run.adapter("best"))  # the best adapters are loaded
        self.load_adapters(final_adapters)
        self._export_peft(self.run.adapter("final"))

    def _export_peft(self, out_dir: Path) -> None:
        """The (global mean) adapter as a PEFT LoRA: adapter_config.json + adapter_model.safetensors."""
        save_peft_adapter(
            self.learner.export_adapter(),
            self.model,
            out_dir,
            base_model_name_or_path=self.cfg.get("base_model_name_or_path", None),
        )

    def cleanup(self) -> None:
        if self._metric_logger is not None:
            self._metric_logger.close()
        for name in ("model", "learner"):  # absent when set-up stopped before building them
            self.__dict__.pop(name, None)
        gc.collect()
        self.replicas.shutdown()


def _resolve_or_error(requested: Any, device: torch.device):
    """The resolved precision, or the error message (so other processes can stop with it)."""
    try:
        return resolve_precision(requested, device)
    except ValueError as err:
        return str(err)


def _is_finished(cfg: DictConfig) -> bool:
    """A resumed run whose results.json exists has nothing left to do, unless an optional step
    (pruning, export) failed: then resuming redoes the end of the run from the last checkpoint."""
    run = RunDir(cfg.output_dir)
    if not (run.results.exists() and bool(cfg.get("resume_from_checkpoint", False))):
        return False
    data = run.read_results()
    return data is None or not data.get("errors")  # unreadable: leave it to the user, do not overwrite


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    if _is_finished(cfg):
        log.info(f"{RunDir(cfg.output_dir).results} exists: this run has finished, nothing to do")
        return
    try:
        check_config_keys(cfg)
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
            f"abmll_recipe: error: {failed}; {RunDir(cfg.output_dir).results} keeps the test "
            f"results (resume_from_checkpoint=True redoes the end of the run)",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    sys.argv = resolve_config_arg(sys.argv)
    sys.exit(recipe_main())
