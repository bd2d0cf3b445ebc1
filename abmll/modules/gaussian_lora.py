"""Gaussian LoRA linear layer: a frozen base weight plus four LoRA pairs.

Per adapted layer with frozen ``W0`` (d_out x d_in) and LoRA scale ``s = alpha / rank``::

    mu_theta = s * B_mu_theta A_mu_theta          global mean offset
    lv_theta = s * B_lv_theta A_lv_theta + c      global log-variance
    mu_phi   = s * B_mu_phi   A_mu_phi            task mean offset
    lv_phi   = s * B_lv_phi   A_lv_phi   + c      task log-variance

    q(phi | D)    = N(W0 + mu_phi,   exp(lv_phi))     (elementwise over the weight)
    p(phi | theta) = N(W0 + mu_theta, exp(lv_theta))

The forward pass uses the task posterior ``q``. Three modes (``GaussianLoRALinear.mode``):

- ``"sample"`` with gradients enabled (training): local reparameterisation. The output
  ``z = x W^T`` of a weight ``W ~ q`` is Gaussian per output unit with mean
  ``x (W0 + mu_phi)^T`` and variance ``x^2 exp(lv_phi)^T``, so we sample the output directly.
  The dense ``exp(lv_phi)`` matrix is built inside ``torch.utils.checkpoint``: it is freed after
  the forward and rebuilt in the backward, so no d_out x d_in tensor per layer stays alive for
  backward (cost: one extra d_out x d_in exp and one extra matmul per layer in the backward).
- ``"sample"`` without gradients (evaluation): one weight sample ``W = W0 + mu_phi + exp(lv_phi / 2) * eps``
  per forward call, shared by every token of the batch, as "one sample from the
  reparameterization step" reads; the dense sample is transient.
- ``"mean"``: deterministic, ``W = W0 + mu_phi``.
"""

from __future__ import annotations

import math
from typing import Iterator, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchtune.modules.peft import AdapterModule

#: The four LoRA pairs, in the order the paper lists them. Each name ``n`` owns the
#: submodules ``lora_{n}_a`` (rank x d_in) and ``lora_{n}_b`` (d_out x rank).
PAIRS: Tuple[str, ...] = ("mu_theta", "lv_theta", "mu_phi", "lv_phi")
THETA_PAIRS: Tuple[str, ...] = ("mu_theta", "lv_theta")
PHI_PAIRS: Tuple[str, ...] = ("mu_phi", "lv_phi")
MODES = ("sample", "mean")


class GaussianLoRALinear(nn.Module, AdapterModule):
    """Frozen linear layer with a Gaussian low-rank weight posterior (ABMLL).

    Args:
        in_dim (int): input dimension.
        out_dim (int): output dimension.
        rank (int): LoRA rank of every pair.
        alpha (float): LoRA scaling numerator; every pair is scaled by ``alpha / rank``.
        c (float): log-variance offset added to both log-variance pairs (``-20`` means a
            per-weight standard deviation of ``exp(-10) ~ 4.5e-5`` at initialisation).
        use_bias (bool): whether the frozen base layer has a bias (Qwen2's q/k/v do).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        c: float = -20.0,
        use_bias: bool = False,
    ):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.rank = rank
        self.alpha = alpha
        self.c = float(c)
        self.use_bias = use_bias
        self.mode = "sample"
        linear = nn.Linear(in_dim, out_dim, bias=use_bias)
        self.weight = nn.Parameter(linear.weight, requires_grad=False)
        self.bias = nn.Parameter(linear.bias, requires_grad=False) if use_bias else None
        for name in PAIRS:
            setattr(self, f"lora_{name}_a", nn.Linear(in_dim, rank, bias=False))
            setattr(self, f"lora_{name}_b", nn.Linear(rank, out_dim, bias=False))
        self.initialize_parameters()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def initialize_parameters(self) -> None:
        """A as torchtune's LoRA (kaiming uniform), B zero, and phi a copy of theta."""
        for name in THETA_PAIRS:
            nn.init.kaiming_uniform_(getattr(self, f"lora_{name}_a").weight, a=math.sqrt(5))
            nn.init.zeros_(getattr(self, f"lora_{name}_b").weight)
        self.copy_theta_to_phi()

    def to_empty(self, *, device=None, recurse: bool = True):
        for name in PAIRS:
            getattr(self, f"lora_{name}_a").to_empty(device=device, recurse=recurse)
            getattr(self, f"lora_{name}_b").to_empty(device=device, recurse=recurse)
        return self

    # --- torchtune adapter protocol -------------------------------------------------------
    def adapter_params(self) -> List[str]:
        return [f"lora_{n}_{ab}.weight" for n in PAIRS for ab in ("a", "b")]

    def pair_params(self, pairs: Tuple[str, ...]) -> Iterator[nn.Parameter]:
        for n in pairs:
            yield getattr(self, f"lora_{n}_a").weight
            yield getattr(self, f"lora_{n}_b").weight

    # --- the low-rank factors ---------------------------------------------------------------
    def factors(self, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, A) of a pair, so that the pair's dense matrix is ``scale * B @ A``."""
        return getattr(self, f"lora_{name}_b").weight, getattr(self, f"lora_{name}_a").weight

    def dense(self, name: str, rows: slice = slice(None)) -> torch.Tensor:
        """Dense value of a pair (rows ``rows``), with ``c`` added for log-variances."""
        b, a = self.factors(name)
        out = self.scale * (b[rows] @ a)
        return out + self.c if name.startswith("lv") else out

    @torch.no_grad()
    def copy_theta_to_phi(self) -> None:
        """phi <- theta for all four matrices (end of Algorithm 1's outer loop)."""
        for src, dst in (("mu_theta", "mu_phi"), ("lv_theta", "lv_phi")):
            for ab in ("a", "b"):
                getattr(self, f"lora_{dst}_{ab}").weight.copy_(
                    getattr(self, f"lora_{src}_{ab}").weight
                )

    # --- forward ---------------------------------------------------------------------------
    def _mean_out(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        b, a = self.factors("mu_phi")
        return out + self.scale * F.linear(F.linear(x, a), b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode not in MODES:
            raise ValueError(f"GaussianLoRALinear.mode must be one of {MODES}, got {self.mode!r}")
        mean = self._mean_out(x)
        if self.mode == "mean":
            return mean
        if torch.is_grad_enabled():
            b, a = self.factors("lv_phi")
            std = checkpoint(
                _output_std, x, a, b, self.scale, self.c, use_reentrant=False
            )
            return mean + std * torch.randn_like(std)
        # Evaluation: one weight sample shared across the batch, transient.
        std_w = torch.exp(0.5 * self.dense("lv_phi"))
        noise = std_w * torch.randn_like(std_w)
        return mean + F.linear(x, noise.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, out_dim={self.out_dim}, rank={self.rank}, "
            f"alpha={self.alpha}, c={self.c}, mode={self.mode}"
        )


def _output_std(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, c: float
) -> torch.Tensor:
    """Standard deviation of ``x W^T`` for ``W`` with elementwise log-variance ``scale*b@a + c``.

    Computed in float32 (variances of ~exp(-20) underflow bf16 sums poorly).
    """
    var_w = torch.exp(scale * (b.float() @ a.float()) + c)
    var_out = F.linear(x.float().square(), var_w)
    # The floor keeps sqrt's gradient finite where an input row is exactly zero.
    return var_out.clamp_min(1e-30).sqrt().to(x.dtype)


def gaussian_lora_modules(model: nn.Module) -> Iterator[Tuple[str, GaussianLoRALinear]]:
    """All ``GaussianLoRALinear`` layers of a model, with their qualified names."""
    for name, module in model.named_modules():
        if isinstance(module, GaussianLoRALinear):
            yield name, module


def set_gaussian_mode(model: nn.Module, mode: str) -> None:
    """Switch every Gaussian LoRA layer between ``"sample"`` and ``"mean"``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for _, module in gaussian_lora_modules(model):
        module.mode = mode
