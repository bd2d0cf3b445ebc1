"""What every learner shares: the episode type, the NLL forward, test-time adaptation.

A learner decides which parameters train, what one meta-training episode does, and how a
copy of the adapters is adapted to an unseen task. The recipe drives: it asks the learner
for the epoch's episodes, hands each to ``train_episode``, and wraps evaluation on an unseen
task in ``with learner.adapted(support_batches):``.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn
from torchtune.modules.peft import LoRALinear, get_adapter_params, set_trainable_params

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

    @property
    def num_tokens(self) -> int:
        return sum(int(b["tokens"].numel()) for b in self.support + self.query)


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"learner.{name} must be {bound}, got {value}")


class Learner:
    """Base class. ``adapter_kind`` says which adapter layers the model must carry:
    ``"gaussian"`` (``GaussianLoRALinear``), ``"lora"`` (torchtune ``LoRALinear``) or ``None``.
    """

    adapter_kind: Optional[str] = None

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
    ):
        _check_positive("inner_steps", inner_steps)
        _check_positive("test_lr", test_lr, allow_zero=True)
        _check_positive("weight_decay", weight_decay, allow_zero=True)
        self.inner_steps = int(inner_steps)
        self.test_lr = float(test_lr)
        self.test_time_adaptation = bool(test_time_adaptation)
        self.weight_decay = float(weight_decay)
        self.model: Optional[nn.Module] = None
        self.device = torch.device("cpu")
        self.compute_dtype = torch.float32

    # --- set-up ---------------------------------------------------------------------------
    def setup(self, model: nn.Module, device: torch.device, compute_dtype: torch.dtype = torch.float32) -> None:
        """Take the model's adapters as this learner's parameters.

        With a lower-precision ``compute_dtype`` (bf16) the frozen model stays in it, but the
        adapters become float32 master weights (their AdamW updates, ~lr, are far below one
        bf16 ulp of their values and would round away), and every forward runs under
        ``torch.autocast(compute_dtype)`` (:meth:`autocast`), which casts them per matmul.
        """
        self._check_model(model)
        self.model = model
        self.device = device
        self.compute_dtype = compute_dtype
        # set_trainable_params matches model.named_parameters(), which carry the activation
        # checkpointing prefix; everything we key by name (checkpoint, resume, export) uses
        # clean names, so a run resumes and exports the same with checkpointing on or off.
        set_trainable_params(model, get_adapter_params(model))
        self.adapter_params = named_adapter_params(model)
        if compute_dtype != torch.float32:
            for p in self.adapter_params.values():
                p.data = p.data.float()

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
    def episodes(self, sampler, epoch: int, seed: int) -> Iterator[Episode]:
        """Per task, in an order shuffled by (seed, epoch): K support batches."""
        for task in self._task_order(sampler, epoch, seed):
            support, _ = sampler.episode(task, epoch, self.inner_steps, 0)
            yield Episode(task, support)

    @staticmethod
    def _task_order(sampler, epoch: int, seed: int) -> List[str]:
        order = list(sampler.task_names)
        random.Random(f"{seed}-{epoch}-task-order").shuffle(order)
        return order

    def num_episodes(self, sampler) -> int:
        return len(sampler.task_names)

    def train_episode(self, episode: Episode) -> Dict[str, float]:
        raise NotImplementedError

    def nll(self, batch: Batch) -> torch.Tensor:
        tokens = batch["tokens"].to(self.device)
        labels = batch["labels"].to(self.device)
        with self.autocast():
            return model_answer_nll(self.model, tokens, labels)

    def _sgd_steps(self, optimizer, batches: List[Batch], loss_fn) -> List[Dict[str, float]]:
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
            self._sgd_steps(optimizer, support, self.adaptation_loss)
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
