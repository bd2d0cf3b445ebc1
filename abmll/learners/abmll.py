"""ABMLL: Algorithm 1 of the paper, one episode per training task."""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn
from torchtune import utils

from abmll.distributed import LOCAL
from abmll.learners.base import Batch, Episode, Learner, _check_non_negative, _check_positive
from abmll.modules import PHI_PAIRS, THETA_PAIRS, gaussian_lora_modules
from abmll.modules.names import clean_name
from abmll.objectives import model_kl, model_kl_and_neg_log_prior

log = utils.get_logger("INFO")

#: The two readings of the outer step's NLL gradient w.r.t. theta (see ``ABMLL``).
OUTER_GRADIENTS = ("kl_only", "first_order")
#: The default reading; the one place to change it.
DEFAULT_OUTER_GRADIENT = "kl_only"
#: Weight of both KL terms (paper: 1e-8); the reporting falls back to it for a run whose
#: config does not name learner.beta.
DEFAULT_BETA = 1e-8


def _grad_norm(params: List[nn.Parameter]) -> float:
    """l2 norm of the gradients of ``params`` (those that have one)."""
    sq = sum(p.grad.float().square().sum() for p in params if p.grad is not None)
    return float(sq) ** 0.5 if torch.is_tensor(sq) else 0.0


class ABMLL(Learner):
    """Amortized Bayesian Meta-Learning for LoRA.

    Per task: K inner AdamW steps on the task pairs phi with ``NLL + beta*KL(q||p(phi|theta))``;
    one outer AdamW step on the global pairs theta with
    ``L = NLL + beta*KL(q||p(phi|theta)) + beta*(-log p(theta))`` at phi_K; then phi <- theta.

    The forward samples from q, so the NLL depends on phi only. How theta sees it is
    ``outer_gradient`` (no second-order terms in either):

    - ``"kl_only"``: phi and theta are separate tensors, so autograd gives theta no NLL
      gradient. The query NLL is computed without autograd and only logged; theta moves
      through dKL/dtheta and the prior.
    - ``"first_order"``: ABML's outer step with a first-order Jacobian,
      ``phi_K = theta + stop_grad(phi_K - theta)``: theta's gradient is
      ``dL/dtheta + dL/dphi`` at phi_K. One more forward/backward on the query batches.

    Args:
        inner_steps: K, inner steps per task (and test-time adaptation steps).
        inner_lr / outer_lr / test_lr: AdamW learning rates (paper: 1e-5 / 5e-5 / 1e-5).
        beta: weight of both KL terms (paper: 1e-8).
        a0, b0: shape and rate of the Gamma prior on the precision exp(-lv_theta).
        num_query_batches: query batches of the outer step's NLL (averaged).
        reset_inner_optimizer: start each task's inner loop with fresh AdamW moments, as
            phi restarts from theta (default True).
        kl_chunk_rows: rows of each layer's dense matrices built at once for KL and prior.
        test_time_adaptation: adapt phi on K support batches before evaluating unseen tasks.
        weight_decay: AdamW weight decay for every optimizer (paper: not used; 0).
        outer_gradient: ``"kl_only"`` or ``"first_order"`` (see above).
        meta_batch_size: M tasks per outer step (not in the paper, whose setting is 1): each
            task's inner loop starts from theta, their outer gradients are averaged, then one
            outer AdamW step.
    """

    adapter_kind = "gaussian"

    def __init__(
        self,
        inner_steps: int = 5,
        inner_lr: float = 1e-5,
        outer_lr: float = 5e-5,
        test_lr: float = 1e-5,
        beta: float = DEFAULT_BETA,
        a0: float = 1.0,
        b0: float = 0.01,
        num_query_batches: int = 1,
        reset_inner_optimizer: bool = True,
        kl_chunk_rows: int = 1024,
        test_time_adaptation: bool = True,
        weight_decay: float = 0.0,
        outer_gradient: str = DEFAULT_OUTER_GRADIENT,
        meta_batch_size: int = 1,
    ):
        super().__init__(inner_steps, test_lr, test_time_adaptation, weight_decay, meta_batch_size)
        if outer_gradient not in OUTER_GRADIENTS:
            raise ValueError(
                f"learner.outer_gradient must be one of {OUTER_GRADIENTS}, got {outer_gradient!r}"
            )
        _check_positive("inner_lr", inner_lr)
        _check_positive("outer_lr", outer_lr)
        _check_non_negative("beta", beta)
        _check_positive("a0", a0)
        _check_positive("b0", b0)
        _check_non_negative("num_query_batches", num_query_batches)
        _check_positive("kl_chunk_rows", kl_chunk_rows)
        self.inner_lr = float(inner_lr)
        self.outer_lr = float(outer_lr)
        self.beta = float(beta)
        self.a0 = float(a0)
        self.b0 = float(b0)
        self.num_query_batches = int(num_query_batches)
        self.reset_inner_optimizer = bool(reset_inner_optimizer)
        self.kl_chunk_rows = int(kl_chunk_rows)
        self.outer_gradient = str(outer_gradient)

    @property
    def method_name(self) -> str:
        # Each reading of the outer step is its own row in the tables.
        return "ABMLL" if self.outer_gradient == "kl_only" else "ABMLL-FO"

    def setup(self, model, device, compute_dtype=torch.float32, replicas=LOCAL) -> None:
        if replicas.world_size > 1 and not self.reset_inner_optimizer:
            raise ValueError(
                "learner.reset_inner_optimizer=false carries the inner AdamW moments from task to "
                "task, which with several processes would differ between them; set it to true "
                "(the default) or run one process"
            )
        super().setup(model, device, compute_dtype, replicas)
        layers = [m for _, m in gaussian_lora_modules(model)]
        self.theta: List[nn.Parameter] = [p for m in layers for p in m.pair_params(THETA_PAIRS)]
        self.phi: List[nn.Parameter] = [p for m in layers for p in m.pair_params(PHI_PAIRS)]
        self.layers = layers
        # (theta, phi) factor pairs, as the layer pairs them for copy_theta_to_phi:
        # first_order adds each phi factor's gradient into its theta factor.
        self.theta_phi_pairs = [pair for m in layers for pair in m.theta_phi_factors()]
        self.inner_optimizer = self._adamw(self.phi, self.inner_lr)
        self.outer_optimizer = self._adamw(self.theta, self.outer_lr)
        log.info(f"ABMLL outer step: outer_gradient={self.outer_gradient}")

    # --- losses ---------------------------------------------------------------------------
    def kl(self) -> torch.Tensor:
        return model_kl(self.model, self.kl_chunk_rows)

    def inner_loss(self, batch: Batch):
        nll = self.nll(batch)
        kl = self.kl()
        return nll + self.beta * kl, {"nll": nll.item(), "kl": kl.item()}

    adaptation_loss = inner_loss

    def adaptation_params(self) -> List[nn.Parameter]:
        return self.phi

    def metrics_nan_by_construction(self) -> set:
        # Without query batches there is no query NLL to report.
        return {"query_nll", "outer_loss"} if self.num_query_batches == 0 else set()

    def _train_only(self, params: List[nn.Parameter]) -> None:
        keep = {id(p) for p in params}
        for p in self.theta + self.phi:
            p.requires_grad_(id(p) in keep)

    # --- one task ---------------------------------------------------------------------------
    def make_episode(self, sampler, key, epoch: int) -> Episode:
        support, query = sampler.episode(key, epoch, self.inner_steps, self.num_query_batches)
        return Episode(key, support, query)

    def train_meta_batch(self, episodes: List[Episode], total: int) -> Dict[str, float]:
        """Per task: the inner loop from theta, then its outer gradient into theta.grad, then
        phi <- theta; after all tasks (of every process): the mean gradient, one AdamW step."""
        logs = []
        for episode in episodes:
            with episode.rng(self.device):
                inner = self._inner_loop(episode.support)
                outer = self._outer_gradient(episode.query)
            self._copy_theta_to_phi()  # the next task starts from theta too
            n = len(inner)
            logs.append({
                "inner_nll": sum(d["nll"] for d in inner) / n,
                "inner_kl": sum(d["kl"] for d in inner) / n,
                **outer,
            })
        self._average_grads(self.theta, total)
        self.outer_optimizer.step()
        self.outer_optimizer.zero_grad(set_to_none=True)
        self._copy_theta_to_phi()
        self._train_only(self.theta + self.phi)
        return {**self._mean_metrics(logs, total), "lr_inner": self.inner_lr, "lr_outer": self.outer_lr}

    def _copy_theta_to_phi(self) -> None:
        for layer in self.layers:
            layer.copy_theta_to_phi()

    def _inner_loop(self, support: List[Batch]) -> List[Dict[str, float]]:
        """K AdamW steps on phi only, with ``NLL + beta*KL``."""
        if self.reset_inner_optimizer:
            self.inner_optimizer = self._adamw(self.phi, self.inner_lr)
        self._train_only(self.phi)
        return self._optimizer_steps(self.inner_optimizer, support, self.inner_loss)

    def _outer_gradient(self, query: List[Batch]) -> Dict[str, float]:
        """Backward of ``NLL(query; phi_K) + beta*(KL + -log p(theta))`` into theta.grad
        (accumulating over a meta-batch's tasks); the step is the caller's.

        Leaves phi as it was (the caller copies theta into it) and no gradient on phi.
        """
        logs: Dict[str, float] = {}
        if self.outer_gradient == "kl_only":
            self._train_only(self.theta)
            # The NLL has no gradient w.r.t. theta: log it, don't backprop it.
            with torch.no_grad():
                query_nlls = [self.nll(b).item() for b in query]
            query_nll = sum(query_nlls) / len(query_nlls) if query_nlls else float("nan")
        else:
            # Gradients on phi and theta; phi's is added into theta's below.
            self._train_only(self.theta + self.phi)
            query_nll = self._query_nll_backward(query)
            logs["outer_nll_grad_norm"] = _grad_norm(self.phi)
        # One pass over the dense matrices for both terms (the global pairs are built once).
        kl, prior = model_kl_and_neg_log_prior(self.model, self.a0, self.b0, self.kl_chunk_rows)
        (self.beta * (kl + prior)).backward()
        if self.outer_gradient == "first_order":
            self._add_phi_grad_to_theta()
        return {
            "query_nll": query_nll,
            "outer_kl": kl.item(),
            "neg_log_prior": prior.item(),
            "outer_loss": query_nll + self.beta * (kl.item() + prior.item()),
            **logs,
        }

    def _query_nll_backward(self, query: List[Batch]) -> float:
        """Backward of the mean query NLL, one batch at a time (one graph alive at once)."""
        total = 0.0
        for batch in query:
            nll = self.nll(batch)
            (nll / len(query)).backward()
            total += nll.item()
        return total / len(query) if query else float("nan")

    @torch.no_grad()
    def _add_phi_grad_to_theta(self) -> None:
        """theta.grad += phi.grad, pairwise: the first-order Jacobian d phi_K / d theta = I."""
        for theta, phi in self.theta_phi_pairs:
            if phi.grad is None:
                continue
            if theta.grad is None:
                theta.grad = phi.grad.clone()
            else:
                theta.grad.add_(phi.grad)
            phi.grad = None

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
        return self._export_pair("mu_theta")

    def export_task_adapter(self) -> Dict[str, torch.Tensor]:
        """The task mean pair (B_mu_phi, A_mu_phi), after :meth:`adapted`: the mean-mode model."""
        return self._export_pair("mu_phi")

    def _export_pair(self, pair: str) -> Dict[str, torch.Tensor]:
        out = {}
        for name, layer in gaussian_lora_modules(self.model):
            b, a = layer.factors(pair)
            name = clean_name(name)  # same names with activation checkpointing on or off
            out[f"{name}.lora_a.weight"] = a.detach().cpu().clone()
            out[f"{name}.lora_b.weight"] = b.detach().cpu().clone()
        return out
