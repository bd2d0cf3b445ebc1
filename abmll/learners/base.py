"""What every learner shares: the episode type, the NLL forward, test-time adaptation.

A learner decides which parameters train, what one meta-training step does, and how a copy of
the adapters is adapted to an unseen task. The recipe drives: it asks the learner for the
epoch's episode keys (tasks, in a seeded order), groups them ``meta_batch_size`` at a time,
builds this process's share of each group (``make_episode``) and hands them to
``train_meta_batch``; evaluation on an unseen task is wrapped in
``with learner.adapted(support_batches):``.

Meta-batch (``learner.meta_batch_size``, not in the paper, whose setting is 1): the outer
update of a step is the average over M tasks: each task's inner loop starts from the same
global adapters, and the M tasks may run in different processes (:mod:`abmll.distributed`).
With M = 1 and one process a step is one task, exactly the paper's algorithm.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn
from torchtune.modules import RMSNorm
from torchtune.modules.peft import LoRALinear, get_adapter_params, set_trainable_params

from abmll.distributed import LOCAL, Replicas, seed_of, seeded
from abmll.modules import GaussianLoRALinear
from abmll.modules.names import named_adapter_params
from abmll.objectives import model_answer_nll

Batch = Dict[str, torch.Tensor]


@dataclass
class Episode:
    """One unit of meta-training: a task's support batches and (ABMLL) query batches."""

    task: str
    support: List[Batch]
    query: List[Batch] = field(default_factory=list)
    # Seed of the episode's own RNG (meta-batch > 1 or several processes: a task then draws
    # the same noise whichever process runs it); None: the running RNG (the paper's setting).
    seed: Optional[int] = None

    def rng(self, device: torch.device, *step):
        """The RNG context the episode's forwards run in (``step``: one step's own)."""
        if self.seed is None:
            return seeded(None, device)
        return seeded(seed_of(self.seed, *step) if step else self.seed, device)

    @property
    def num_tokens(self) -> int:
        return sum(int(b["tokens"].numel()) for b in self.support + self.query)


def _check_positive(name: str, value) -> None:
    if not value > 0:
        raise ValueError(f"learner.{name} must be > 0, got {value}")


def _check_non_negative(name: str, value) -> None:
    if not value >= 0:
        raise ValueError(f"learner.{name} must be >= 0, got {value}")


class Learner:
    """Base class. ``adapter_kind`` says which adapter layers the model must carry:
    ``"gaussian"`` (``GaussianLoRALinear``), ``"lora"`` (torchtune ``LoRALinear``) or ``None``.
    """

    adapter_kind: Optional[str] = None
    # Whether the learner meta-trains (has episodes); one that does not has no meta-batch.
    meta_trains: bool = True

    @property
    def method_name(self) -> str:
        """The method as results and tables name it (a variant of a class gets its own name)."""
        return type(self).__name__

    def __init__(
        self,
        inner_steps: int = 5,
        test_lr: float = 1e-5,
        test_time_adaptation: bool = True,
        weight_decay: float = 0.0,
        meta_batch_size: int = 1,
    ):
        _check_positive("inner_steps", inner_steps)
        _check_non_negative("test_lr", test_lr)
        _check_non_negative("weight_decay", weight_decay)
        _check_positive("meta_batch_size", meta_batch_size)
        self.meta_batch_size = int(meta_batch_size)
        self.inner_steps = int(inner_steps)
        self.test_lr = float(test_lr)
        self.test_time_adaptation = bool(test_time_adaptation)
        self.weight_decay = float(weight_decay)
        self.model: Optional[nn.Module] = None
        self.device = torch.device("cpu")
        self.compute_dtype = torch.float32
        self.replicas = LOCAL

    # --- set-up ---------------------------------------------------------------------------
    def setup(
        self,
        model: nn.Module,
        device: torch.device,
        compute_dtype: torch.dtype = torch.float32,
        replicas: Replicas = LOCAL,
    ) -> None:
        """Take the model's adapters as this learner's parameters.

        With several processes (``replicas``) the adapters are made identical on all of them
        (process 0's), and each meta-step's update is summed over them.

        With a lower-precision ``compute_dtype`` (bf16) the frozen model stays in it, but the
        adapters become float32 master weights (their AdamW updates, ~lr, are far below one
        bf16 ulp of their values and would round away), and every forward runs under
        ``torch.autocast(compute_dtype)`` (:meth:`autocast`), which casts them per matmul.
        """
        self._check_model(model)
        if self.meta_trains and self.meta_batch_size % replicas.world_size:
            raise ValueError(
                f"learner.meta_batch_size={self.meta_batch_size} must be a multiple of the number of "
                f"processes ({replicas.world_size}): each process runs meta_batch_size / "
                f"{replicas.world_size} tasks per step"
            )
        self.model = model
        self.device = device
        self.compute_dtype = compute_dtype
        self.replicas = replicas
        # set_trainable_params matches model.named_parameters(), which carry the activation
        # checkpointing prefix; everything we key by name (checkpoint, resume, export) uses
        # clean names, so a run resumes and exports the same with checkpointing on or off.
        set_trainable_params(model, get_adapter_params(model))
        self.adapter_params = named_adapter_params(model)
        if compute_dtype != torch.float32:
            for p in self.adapter_params.values():
                p.data = p.data.float()
            # torchtune's RMSNorm computes in float32 (x.float()) but passes its scale as stored;
            # a bf16 scale misses the fused kernel (and torch warns "Mismatch dtype between input
            # and weight"). A float32 copy of the same values gives the same output, fused.
            for m in model.modules():
                if isinstance(m, RMSNorm):
                    m.scale.data = m.scale.data.float()
        # torchtune seeds each process with seed + rank, so the adapters' random initial
        # values differ between processes: take process 0's.
        replicas.broadcast_([p.data for p in self.adapter_params.values()])

    def autocast(self):
        """The context every model forward runs in: bf16 autocast when the compute dtype is
        lower than float32, nothing otherwise (float32 runs are bit-identical to no context)."""
        return torch.autocast(
            self.device.type,
            dtype=self.compute_dtype,
            enabled=self.compute_dtype != torch.float32,
        )

    def _check_model(self, model: nn.Module) -> None:
        n_gauss = sum(isinstance(m, GaussianLoRALinear) for m in model.modules())
        n_lora = sum(isinstance(m, LoRALinear) for m in model.modules())
        name = type(self).__name__
        if self.adapter_kind == "gaussian" and (n_gauss == 0 or n_lora):
            raise ValueError(
                f"learner {name} needs a model whose adapters are GaussianLoRALinear "
                f"(e.g. model._component_: abmll.models.gaussian_lora_llama3_8b); the configured "
                f"model has {n_gauss} GaussianLoRALinear and {n_lora} LoRALinear layers"
            )
        if self.adapter_kind == "lora" and (n_lora == 0 or n_gauss):
            raise ValueError(
                f"learner {name} needs a model with torchtune LoRALinear adapters "
                f"(e.g. model._component_: torchtune.models.llama3.lora_llama3_8b); the configured "
                f"model has {n_lora} LoRALinear and {n_gauss} GaussianLoRALinear layers"
            )

    def _adamw(self, params, lr: float) -> torch.optim.AdamW:
        return torch.optim.AdamW(list(params), lr=lr, weight_decay=self.weight_decay)

    # --- training ---------------------------------------------------------------------------
    def episode_keys(self, sampler, epoch: int, seed: int) -> List:
        """The epoch's episodes, in order, as keys for :meth:`make_episode`: the training
        tasks in an order shuffled by (seed, epoch)."""
        return self._task_order(sampler, epoch, seed)

    def make_episode(self, sampler, key, epoch: int) -> Episode:
        """Per task: K support batches."""
        support, _ = sampler.episode(key, epoch, self.inner_steps, 0)
        return Episode(key, support)

    def episodes(self, sampler, epoch: int, seed: int) -> Iterator[Episode]:
        for key in self.episode_keys(sampler, epoch, seed):
            yield self.make_episode(sampler, key, epoch)

    @staticmethod
    def _task_order(sampler, epoch: int, seed: int) -> List[str]:
        order = list(sampler.task_names)
        random.Random(f"{seed}-{epoch}-task-order").shuffle(order)
        return order

    def num_episodes(self, sampler) -> int:
        return len(sampler.task_names)

    def train_episode(self, episode: Episode) -> Dict[str, float]:
        """One meta-step on one task (meta-batch 1, one process)."""
        return self.train_meta_batch([episode], 1)

    def train_meta_batch(self, episodes: List[Episode], total: int) -> Dict[str, float]:
        """One meta-step over a meta-batch of ``total`` tasks, of which ``episodes`` are this
        process's share (possibly none); returns the step's metrics averaged over the tasks."""
        raise NotImplementedError

    def _mean_metrics(self, per_episode: List[Dict[str, float]], total: int) -> Dict[str, float]:
        """Metrics averaged over the ``total`` tasks of a meta-step, on every process."""
        sums: Dict[str, float] = {}
        for metrics in per_episode:
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        return {k: v / total for k, v in self.replicas.sum_metrics(sums).items()}

    def _average_grads(self, params: List[nn.Parameter], total: int) -> None:
        """Gradients summed over processes and divided by the meta-batch's ``total`` tasks
        (exact no-ops for one task in one process)."""
        if self.replicas.world_size > 1:
            for p in params:
                if p.grad is None:  # a process without episodes in this step adds zeros
                    p.grad = torch.zeros_like(p)
            self.replicas.all_reduce_sum_([p.grad for p in params])
        if total != 1:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(total)

    def nll(self, batch: Batch) -> torch.Tensor:
        tokens = batch["tokens"].to(self.device)
        labels = batch["labels"].to(self.device)
        with self.autocast():
            return model_answer_nll(self.model, tokens, labels)

    def metrics_nan_by_construction(self) -> set:
        """Names of this learner's step metrics that are NaN by construction in its current
        setting (not a failure: the recipe's finiteness check skips them)."""
        return set()

    def _optimizer_steps(self, optimizer, batches: List[Batch], loss_fn) -> List[Dict[str, float]]:
        """One step of ``optimizer`` (the learners use AdamW) per batch of ``loss_fn``."""
        logs = []
        for batch in batches:
            loss, parts = loss_fn(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            logs.append(parts)
        return logs

    # --- test-time adaptation -----------------------------------------------------------------
    def adaptation_loss(self, batch: Batch):
        nll = self.nll(batch)
        return nll, {"nll": nll.item()}

    def adaptation_params(self) -> List[nn.Parameter]:
        return list(self.adapter_params.values())

    @contextlib.contextmanager
    def adapted(self, support: List[Batch]) -> Iterator[None]:
        """Adapt a copy of the adapters on ``support`` (one step a batch), then restore them."""
        if not self.test_time_adaptation or not support:
            yield
            return
        saved = {k: p.detach().clone() for k, p in self.adapter_params.items()}
        params = self.adaptation_params()
        trainable = {id(p) for p in params}
        flags = {k: p.requires_grad for k, p in self.adapter_params.items()}
        for p in self.adapter_params.values():
            p.requires_grad_(id(p) in trainable)
        try:
            optimizer = self._adamw(params, self.test_lr)
            self._optimizer_steps(optimizer, support, self.adaptation_loss)
            yield
        finally:
            with torch.no_grad():
                for k, p in self.adapter_params.items():
                    p.copy_(saved[k])
                    p.requires_grad_(flags[k])

    # --- state ------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, object]:
        return {}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        pass

    def export_adapter(self) -> Dict[str, torch.Tensor]:
        """The adapter to publish as a standard LoRA (torchtune names ``...lora_a.weight``,
        clean of the activation checkpointing prefix, as ``adapter_params`` is keyed)."""
        return {k: p.detach().cpu().clone() for k, p in self.adapter_params.items()}

    def export_task_adapter(self) -> Dict[str, torch.Tensor]:
        """The adapter as adapted to one task (call it inside :meth:`adapted`), as a standard
        LoRA: what the model computes in mean mode. Plain LoRA adapters are adapted in place."""
        return self.export_adapter()
