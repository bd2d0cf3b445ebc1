"""The paper's baselines on torchtune's plain LoRA: Pretrained, Regular LoRA,
Structured LoRA and Reptile. All use the same test-time adaptation as ABMLL
(K AdamW steps on the adapters, then evaluate, then restore) unless switched off."""

from __future__ import annotations

from typing import Dict, List

import torch

from abmll.distributed import LOCAL
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
    meta_trains = False  # any number of processes: it only evaluates (each its share of tasks)

    def __init__(self, inner_steps: int = 5, test_lr: float = 1e-5, test_time_adaptation: bool = False,
                 meta_batch_size: int = 1):
        # meta_batch_size is accepted (a sweep may set it for every method) and has no effect.
        super().__init__(inner_steps, test_lr, test_time_adaptation, meta_batch_size=meta_batch_size)

    @property
    def method_name(self) -> str:
        return "PretrainedTTA" if self.test_time_adaptation else "Pretrained"

    def setup(self, model, device, compute_dtype=torch.float32, replicas=LOCAL) -> None:
        super().setup(model, device, compute_dtype, replicas)
        if self.test_time_adaptation and not self.adapter_params:
            raise ValueError(
                "learner.test_time_adaptation=true for Pretrained adapts LoRA adapters from zero, "
                "but the configured model has none (use e.g. model._component_: "
                "abmll.models.lora_smollm2_135m, as the pretrained configs do)"
            )

    def episode_keys(self, sampler, epoch: int, seed: int) -> List:
        return []

    def num_episodes(self, sampler) -> int:
        return 0


class StructuredLoRA(Learner):
    """One LoRA trained K steps on one task at a time, tasks in turn; no global copy, no reset.

    With a meta-batch of M tasks, step k's gradient is the mean of the M tasks' k-th batch
    gradients (data parallel over tasks), so a meta-step is still K AdamW steps."""

    adapter_kind = "lora"

    def __init__(
        self,
        inner_steps: int = 5,
        lr: float = 1e-5,
        test_lr: float = 1e-5,
        test_time_adaptation: bool = True,
        weight_decay: float = 0.0,
        meta_batch_size: int = 1,
    ):
        super().__init__(inner_steps, test_lr, test_time_adaptation, weight_decay, meta_batch_size)
        _check_positive("lr", lr)
        self.lr = float(lr)

    def setup(self, model, device, compute_dtype=torch.float32, replicas=LOCAL) -> None:
        super().setup(model, device, compute_dtype, replicas)
        self.optimizer = self._adamw(self.adapter_params.values(), self.lr)

    def train_meta_batch(self, episodes: List[Episode], total: int) -> Dict[str, float]:
        params = list(self.adapter_params.values())
        logs: List[List[Dict[str, float]]] = [[] for _ in episodes]
        for k in range(self.inner_steps):
            for episode, log in zip(episodes, logs):
                if k < len(episode.support):
                    with episode.rng(self.device, k):
                        loss, parts = self.adaptation_loss(episode.support[k])
                        loss.backward()
                    log.append(parts)
            self._average_grads(params, total)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return {**self._mean_metrics([_mean_nll(log) for log in logs], total), "lr": self.lr}

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
        meta_batch_size: int = 1,
    ):
        super().__init__(inner_steps, lr, test_lr, test_time_adaptation, weight_decay, meta_batch_size)
        self._pooled = (None, [])

    def episode_keys(self, sampler, epoch: int, seed: int) -> List:
        return list(range(self.num_episodes(sampler)))  # chunk i of the epoch's pooled batches

    def make_episode(self, sampler, key, epoch: int) -> Episode:
        if self._pooled[0] != (id(sampler), epoch):
            batches = sampler.pooled_batches(epoch, self.num_episodes(sampler) * self.inner_steps)
            self._pooled = ((id(sampler), epoch), batches)
        batches = self._pooled[1]
        return Episode(f"pooled{key}", batches[key * self.inner_steps : (key + 1) * self.inner_steps])


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
        meta_batch_size: int = 1,
    ):
        super().__init__(inner_steps, lr, test_lr, test_time_adaptation, weight_decay, meta_batch_size)
        if not 0.0 < epsilon <= 1.0:
            raise ValueError(f"learner.epsilon must be in (0, 1], got {epsilon}")
        self.epsilon = float(epsilon)

    def train_meta_batch(self, episodes: List[Episode], total: int) -> Dict[str, float]:
        """Per task: K steps from theta; then theta += epsilon * (mean of the moves phi_i - theta)."""
        theta = {k: p.detach().clone() for k, p in self.adapter_params.items()}
        moves = {k: torch.zeros_like(p) for k, p in theta.items()}
        logs = []
        for episode in episodes:
            with episode.rng(self.device):
                self.optimizer = self._adamw(self.adapter_params.values(), self.lr)
                logs.append(_mean_nll(self._optimizer_steps(self.optimizer, episode.support, self.adaptation_loss)))
            with torch.no_grad():
                for k, p in self.adapter_params.items():
                    moves[k] += p - theta[k]
                    p.copy_(theta[k])  # the next task starts from theta too
        self.replicas.all_reduce_sum_(list(moves.values()))
        with torch.no_grad():
            for k, p in self.adapter_params.items():
                p.copy_(theta[k] + self.epsilon * (moves[k] / total))
        return {**self._mean_metrics(logs, total), "lr": self.lr}

    def state_dict(self):
        return {}  # the inner optimizer restarts every task

    def load_state_dict(self, state) -> None:
        pass
