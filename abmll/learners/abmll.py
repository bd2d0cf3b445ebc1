"""ABMLL: Algorithm 1 of the paper, one episode per training task."""

from __future__ import annotations

from typing import Dict, Iterator, List

import torch
from torch import nn

from abmll.learners.base import Batch, Episode, Learner, _check_positive
from abmll.modules import PHI_PAIRS, THETA_PAIRS, gaussian_lora_modules
from abmll.objectives import model_kl, model_neg_log_prior


class ABMLL(Learner):
    """Amortized Bayesian Meta-Learning for LoRA.

    Per task: K inner AdamW steps on the task pairs phi with ``NLL + beta*KL(q||p(phi|theta))``;
    one outer AdamW step on the global pairs theta with
    ``NLL + beta*KL(q||p(phi|theta)) + beta*(-log p(theta))``; then phi <- theta.

    The NLL depends on phi only (the forward samples from q), so it gives theta no gradient:
    the outer step's NLL on the query batch is computed without autograd and only logged,
    and theta moves through the two KL terms. No second-order terms.

    Args:
        inner_steps: K, inner steps per task (and test-time adaptation steps).
        inner_lr / outer_lr / test_lr: AdamW learning rates (paper: 1e-5 / 5e-5 / 1e-5).
        beta: weight of both KL terms (paper: 1e-8).
        a0, b0: shape and rate of the Gamma prior on the precision exp(-lv_theta).
        num_query_batches: query batches drawn for the outer step's (logged) NLL.
        reset_inner_optimizer: start each task's inner loop with fresh AdamW moments, as
            phi restarts from theta (default True).
        kl_chunk_rows: rows of each layer's dense matrices built at once for KL and prior.
        test_time_adaptation: adapt phi on K support batches before evaluating unseen tasks.
        weight_decay: AdamW weight decay for every optimizer (paper: not used; 0).
    """

    adapter_kind = "gaussian"

    def __init__(
        self,
        inner_steps: int = 5,
        inner_lr: float = 1e-5,
        outer_lr: float = 5e-5,
        test_lr: float = 1e-5,
        beta: float = 1e-8,
        a0: float = 1.0,
        b0: float = 0.01,
        num_query_batches: int = 1,
        reset_inner_optimizer: bool = True,
        kl_chunk_rows: int = 1024,
        test_time_adaptation: bool = True,
        weight_decay: float = 0.0,
    ):
        super().__init__(inner_steps, test_lr, test_time_adaptation, weight_decay)
        _check_positive("inner_lr", inner_lr)
        _check_positive("outer_lr", outer_lr)
        _check_positive("beta", beta, allow_zero=True)
        _check_positive("a0", a0)
        _check_positive("b0", b0)
        _check_positive("num_query_batches", num_query_batches, allow_zero=True)
        _check_positive("kl_chunk_rows", kl_chunk_rows)
        self.inner_lr = float(inner_lr)
        self.outer_lr = float(outer_lr)
        self.beta = float(beta)
        self.a0 = float(a0)
        self.b0 = float(b0)
        self.num_query_batches = int(num_query_batches)
        self.reset_inner_optimizer = bool(reset_inner_optimizer)
        self.kl_chunk_rows = int(kl_chunk_rows)

    def setup(self, model: nn.Module, device: torch.device) -> None:
        super().setup(model, device)
        layers = [m for _, m in gaussian_lora_modules(model)]
        self.theta: List[nn.Parameter] = [p for m in layers for p in m.pair_params(THETA_PAIRS)]
        self.phi: List[nn.Parameter] = [p for m in layers for p in m.pair_params(PHI_PAIRS)]
        self.layers = layers
        self.inner_optimizer = self._adamw(self.phi, self.inner_lr)
        self.outer_optimizer = self._adamw(self.theta, self.outer_lr)

    # --- losses ---------------------------------------------------------------------------
    def kl(self) -> torch.Tensor:
        return model_kl(self.model, self.kl_chunk_rows)

    def neg_log_prior(self) -> torch.Tensor:
        return model_neg_log_prior(self.model, self.a0, self.b0, self.kl_chunk_rows)

    def inner_loss(self, batch: Batch):
        nll = self.nll(batch)
        kl = self.kl()
        return nll + self.beta * kl, {"nll": nll.item(), "kl": kl.item()}

    adaptation_loss = inner_loss

    def adaptation_params(self) -> List[nn.Parameter]:
        return self.phi

    def _train_only(self, params: List[nn.Parameter]) -> None:
        keep = {id(p) for p in params}
        for p in self.theta + self.phi:
            p.requires_grad_(id(p) in keep)

    # --- one task ---------------------------------------------------------------------------
    def episodes(self, sampler, epoch: int, seed: int) -> Iterator[Episode]:
        for task in self._task_order(sampler, epoch, seed):
            support, query = sampler.episode(task, epoch, self.inner_steps, self.num_query_batches)
            yield Episode(task, support, query)

    def train_episode(self, episode: Episode) -> Dict[str, float]:
        if self.reset_inner_optimizer:
            self.inner_optimizer = self._adamw(self.phi, self.inner_lr)
        # Inner loop: phi only.
        self._train_only(self.phi)
        inner = self._sgd_steps(self.inner_optimizer, episode.support, self.inner_loss)
        # Outer step: theta only. The NLL has no gradient w.r.t. theta: log it, don't backprop it.
        self._train_only(self.theta)
        with torch.no_grad():
            query_nlls = [self.nll(b).item() for b in episode.query]
        query_nll = sum(query_nlls) / len(query_nlls) if query_nlls else float("nan")
        kl = self.kl()
        prior = self.neg_log_prior()
        (self.beta * (kl + prior)).backward()
        self.outer_optimizer.step()
        self.outer_optimizer.zero_grad(set_to_none=True)
        # phi <- theta
        for layer in self.layers:
            layer.copy_theta_to_phi()
        self._train_only(self.theta + self.phi)
        n = len(inner)
        return {
            "inner_nll": sum(d["nll"] for d in inner) / n,
            "inner_kl": sum(d["kl"] for d in inner) / n,
            "query_nll": query_nll,
            "outer_kl": kl.item(),
            "neg_log_prior": prior.item(),
            "outer_loss": query_nll + self.beta * (kl.item() + prior.item()),
            "lr_inner": self.inner_lr,
            "lr_outer": self.outer_lr,
        }

    # --- state / export -------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, object]:
        return {
            "inner_optimizer": self.inner_optimizer.state_dict(),
            "outer_optimizer": self.outer_optimizer.state_dict(),
        }

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.inner_optimizer.load_state_dict(state["inner_optimizer"])
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])

    def export_adapter(self) -> Dict[str, torch.Tensor]:
        """The global mean pair (B_mu_theta, A_mu_theta) as a standard LoRA adapter."""
        out = {}
        for name, layer in gaussian_lora_modules(self.model):
            b, a = layer.factors("mu_theta")
            out[f"{name}.lora_a.weight"] = a.detach().cpu().clone()
            out[f"{name}.lora_b.weight"] = b.detach().cpu().clone()
        return out
