"""The paper's baselines on torchtune's plain LoRA: Pretrained, Regular LoRA,
Structured LoRA and Reptile. All use the same test-time adaptation as ABMLL
(K AdamW steps on the adapters, then evaluate, then restore) unless switched off."""

from __future__ import annotations

from typing import Dict, Iterator

import torch

from abmll.learners.base import Episode, Learner, _check_positive


def _mean_nll(logs) -> Dict[str, float]:
    return {"inner_nll": sum(d["nll"] for d in logs) / len(logs)}


class Pretrained(Learner):
    """The off-the-shelf model: no training, and no test-time adaptation by default.

    With ``test_time_adaptation: true`` it is the "Pretrained + TTA" control: a plain LoRA
    from zero, adapted K steps at ``test_lr`` on each unseen task's support batches exactly as
    the meta-trained methods are, so a table shows what meta-training adds over adapting at
    test time. That needs a model with LoRA adapters (the pretrained configs build one).
    """

    adapter_kind = None

    def __init__(self, inner_steps: int = 5, test_lr: float = 1e-5, test_time_adaptation: bool = False):
        super().__init__(inner_steps, test_lr, test_time_adaptation)

    @property
    def method_name(self) -> str:
        return "PretrainedTTA" if self.test_time_adaptation else "Pretrained"

    def setup(self, model, device, compute_dtype=torch.float32) -> None:
        super().setup(model, device, compute_dtype)
        if self.test_time_adaptation and not self.adapter_params:
            raise ValueError(
                "learner.test_time_adaptation=true for Pretrained adapts LoRA adapters from zero, "
                "but the configured model has none (use e.g. model._component_: "
                "abmll.models.lora_smollm2_135m, as the pretrained configs do)"
            )

    def episodes(self, sampler, epoch: int, seed: int) -> Iterator[Episode]:
        return iter(())

    def num_episodes(self, sampler) -> int:
        return 0


class StructuredLoRA(Learner):
    """One LoRA trained K steps on one task at a time, tasks in turn; no global copy, no reset."""

    adapter_kind = "lora"

    def __init__(
        self,
        inner_steps: int = 5,
        lr: float = 1e-5,
        test_lr: float = 1e-5,
        test_time_adaptation: bool = True,
        weight_decay: float = 0.0,
    ):
        super().__init__(inner_steps, test_lr, test_time_adaptation, weight_decay)
        _check_positive("lr", lr)
        self.lr = float(lr)

    def setup(self, model, device, compute_dtype=torch.float32) -> None:
        super().setup(model, device, compute_dtype)
        self.optimizer = self._adamw(self.adapter_params.values(), self.lr)

    def train_episode(self, episode: Episode) -> Dict[str, float]:
        logs = self._sgd_steps(self.optimizer, episode.support, self.adaptation_loss)
        return {**_mean_nll(logs), "lr": self.lr}

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


class RegularLoRA(StructuredLoRA):
    """Standard LoRA on all training tasks shuffled together.

    An epoch takes as many steps as the per-task methods (tasks x K), in chunks of K
    batches drawn from the pooled, shuffled training set (paper Table 4: lr 5e-5).
    """

    def __init__(
        self,
        inner_steps: int = 5,
        lr: float = 5e-5,
        test_lr: float = 1e-5,
        test_time_adaptation: bool = True,
        weight_decay: float = 0.0,
    ):
        super().__init__(inner_steps, lr, test_lr, test_time_adaptation, weight_decay)

    def episodes(self, sampler, epoch: int, seed: int) -> Iterator[Episode]:
        n = self.num_episodes(sampler)
        batches = sampler.pooled_batches(epoch, n * self.inner_steps)
        for i in range(n):
            yield Episode("pooled", batches[i * self.inner_steps : (i + 1) * self.inner_steps])


class Reptile(StructuredLoRA):
    """Reptile on the LoRA adapters: per task, K AdamW steps from theta to phi, then
    ``theta <- theta + epsilon * (phi - theta)``. The inner AdamW starts fresh for each task."""

    def __init__(
        self,
        inner_steps: int = 5,
        lr: float = 1e-5,
        epsilon: float = 0.5,
        test_lr: float = 1e-5,
        test_time_adaptation: bool = True,
        weight_decay: float = 0.0,
    ):
        super().__init__(inner_steps, lr, test_lr, test_time_adaptation, weight_decay)
        if not 0.0 < epsilon <= 1.0:
            raise ValueError(f"learner.epsilon must be in (0, 1], got {epsilon}")
        self.epsilon = float(epsilon)

    def train_episode(self, episode: Episode) -> Dict[str, float]:
        theta = {k: p.detach().clone() for k, p in self.adapter_params.items()}
        self.optimizer = self._adamw(self.adapter_params.values(), self.lr)
        logs = self._sgd_steps(self.optimizer, episode.support, self.adaptation_loss)
        with torch.no_grad():
            for k, p in self.adapter_params.items():
                p.copy_(theta[k] + self.epsilon * (p - theta[k]))
        return {**_mean_nll(logs), "lr": self.lr}

    def state_dict(self):
        return {}  # the inner optimizer restarts every task

    def load_state_dict(self, state) -> None:
        pass
