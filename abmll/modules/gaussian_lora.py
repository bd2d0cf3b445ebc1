"""Gaussian LoRA linear layer: a frozen base weight plus four LoRA pairs.

Per adapted layer with frozen ``W0`` (d_out x d_in) and LoRA scale ``s = alpha / rank``::

    mu_theta = s * B_mu_theta A_mu_theta          global mean offset
    lv_theta = s * B_lv_theta A_lv_theta + c      global log-variance
    mu_phi   = s * B_mu_phi   A_mu_phi            task mean offset
    lv_phi   = s * B_lv_phi   A_lv_phi   + c      task log-variance

    q(phi | D)    = N(W0 + mu_phi,   exp(lv_phi))     (elementwise over the weight)
    p(phi | theta) = N(W0 + mu_theta, exp(lv_theta))

The forward pass uses the task posterior ``q``. Three modes (``GaussianLoRALinear.mode``):

- ``"sample"`` with gradients enabled (training). Two estimators of the same expected NLL
  (``GaussianLoRALinear.sampling``):

  * ``"local"``: local reparameterisation. The output ``z = x W^T`` of a weight
    ``W ~ q`` is Gaussian per output unit with mean ``x (W0 + mu_phi)^T`` and variance
    ``x^2 exp(lv_phi)^T``, so we sample the output directly, with independent noise per token.
    The whole noise term ``eps * sqrt(x^2 exp(lv_phi)^T)`` is computed inside
    ``torch.utils.checkpoint`` (which restores the RNG state when it recomputes), so it keeps
    nothing for backward beyond what LoRA keeps (``x``): no dense d_out x d_in matrix, no
    output variance, no ``eps``. The variance matmul runs in the compute dtype (``x``'s dtype)
    with ``exp(c)`` and a per-row maximum factored out (``exp(lv) = exp(c + m_j) exp(sBA - m_j)``,
    values in (0, 1]), so it is safe in bf16. Cost per adapted layer: one dense exp and matmul
    in the forward, and in the backward the recomputation plus two matmuls.
  * ``"weight"`` (default; docs/notes.md, note 30): one weight sample
    ``W = W0 + mu_phi + exp(lv_phi / 2) * eps`` per forward call,
    shared by every token of the batch (a higher-variance estimator of the same objective).
    A custom autograd function keeps only ``x``, the factors and an RNG seed, and regenerates
    ``eps`` in the backward: one dense matmul in the forward and two in the backward (float32:
    ``W0`` and the noise folded into one matrix). In bf16 the noise (std ~4.5e-5 at c = -20) is
    below the resolution of ``W0``, so the noise gets its own matmul there (forward and
    backward), which costs as much as ``"local"`` minus its recomputation.
- ``"sample"`` without gradients (evaluation): one weight sample ``W = W0 + mu_phi + exp(lv_phi / 2) * eps``
  per forward call, shared by every token of the batch, as "one sample from the
  reparameterization step" reads; the dense sample is transient.
- ``"mean"``: deterministic, ``W = W0 + mu_phi``.
"""

from __future__ import annotations

import contextlib
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
#: Default log-variance offset ``c`` (docs/notes.md, note 1); the model builders' default.
DEFAULT_C = -20.0
#: Training-time estimators (``GaussianLoRALinear.sampling``); see the module docstring.
SAMPLINGS = ("local", "weight")
#: The default estimator of every Gaussian builder (the packaged configs say it too, and a test
#: holds them to it); the reporting names rows by it. Runs recorded before ``model.sampling``
#: existed trained with "local" whatever this says (``run_contract.RESUME_ADDED_DEFAULTS``).
#: "weight" since note 30 (docs/notes.md): the paper's "one sample from the reparameterization
#: step", as good as "local" over 3 seeds and 1.26x cheaper per episode.
DEFAULT_SAMPLING = "weight"
#: Dtypes in which the frozen weight resolves the noise of a weight sample (fold W0 + noise).
_FOLD_DTYPES = (torch.float32, torch.float64)


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
        sampling (str): training-time estimator, ``"local"`` (local reparameterisation, per-token
            noise) or ``"weight"`` (one weight sample per forward call; default).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        c: float = DEFAULT_C,
        use_bias: bool = False,
        sampling: str = DEFAULT_SAMPLING,
    ):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.rank = rank
        self.alpha = alpha
        self.c = float(c)
        self.use_bias = use_bias
        self.mode = "sample"
        self.sampling = sampling
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

    def theta_phi_factors(self) -> List[Tuple[nn.Parameter, nn.Parameter]]:
        """Every theta factor with its phi counterpart (mu_theta's A with mu_phi's A, ...): the
        one pairing that the copy phi <- theta and the first-order outer step use."""
        return [
            (getattr(self, f"lora_{t}_{ab}").weight, getattr(self, f"lora_{f}_{ab}").weight)
            for t, f in zip(THETA_PAIRS, PHI_PAIRS)
            for ab in ("a", "b")
        ]

    @torch.no_grad()
    def copy_theta_to_phi(self) -> None:
        """phi <- theta for all four matrices (end of Algorithm 1's outer loop)."""
        for theta, phi in self.theta_phi_factors():
            phi.copy_(theta)

    # --- forward ---------------------------------------------------------------------------
    def _mean_output(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output in mean mode: ``W0 x + bias`` plus :meth:`_mean_offset`."""
        return F.linear(x, self.weight, self.bias) + self._mean_offset(x)

    def _mean_offset(self, x: torch.Tensor) -> torch.Tensor:
        """The task mean's LoRA term alone, ``scale * B_mu_phi A_mu_phi x`` (no W0)."""
        b, a = self.factors("mu_phi")
        return self.scale * F.linear(F.linear(x, a), b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode not in MODES:
            raise ValueError(f"GaussianLoRALinear.mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "mean":
            return self._mean_output(x)
        if torch.is_grad_enabled():
            if self.sampling == "local":
                b, a = self.factors("lv_phi")
                noise = checkpoint(_output_noise, x, a, b, self.scale, self.c, use_reentrant=False)
                return self._mean_output(x) + noise
            if self.sampling == "weight":
                b, a = self.factors("lv_phi")
                seed = _draw_seed()
                out = _SampledWeightLinear.apply(
                    x, self.weight, a, b, self.scale, self.c, seed, _can_fold(x)
                )
                if self.bias is not None:
                    out = out + self.bias
                return out + self._mean_offset(x)
            raise ValueError(
                f"GaussianLoRALinear.sampling must be one of {SAMPLINGS}, got {self.sampling!r}"
            )
        # Evaluation: one weight sample shared across the batch, transient; built in float32
        # (a bf16 log-variance near c = -20 has a resolution of 0.125).
        noise = self.sample_weight_noise()
        if _can_fold(x):  # W0 resolves the noise: one matmul
            return F.linear(x, (self.weight + noise).to(x.dtype), self.bias) + self._mean_offset(x)
        return self._mean_output(x) + F.linear(x, noise.to(x.dtype))

    def sample_weight_noise(self) -> torch.Tensor:
        """One float32 sample of ``W - (W0 + mu_phi)`` = ``exp(lv_phi / 2) * eps`` (evaluation)."""
        b, a = self.factors("lv_phi")
        with _float32_only(a):  # under bf16 autocast the matmul would round lv to 0.125 steps
            std_w = torch.exp(0.5 * (b.float() @ (a.float() * self.scale) + self.c))
        return std_w * torch.randn_like(std_w)

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, out_dim={self.out_dim}, rank={self.rank}, "
            f"alpha={self.alpha}, c={self.c}, mode={self.mode}, sampling={self.sampling}"
        )


#: Floor of the relative output variance, so that sqrt's gradient stays finite where an input
#: row is exactly zero (representable in bf16, whose exponent range is float32's).
_VAR_FLOOR = 1e-30


def _can_fold(x: torch.Tensor) -> bool:
    """Whether W0 + noise can be one matmul: W0 must resolve the noise (std ~4.5e-5 at c = -20),
    so the matmul must run in float32 or wider, not under a lower-precision autocast."""
    return x.dtype in _FOLD_DTYPES and not torch.is_autocast_enabled(x.device.type)


def _float32_only(t: torch.Tensor):
    """Autocast off: a log-variance near c = -20 must be built in float32 even when the model's
    forward runs under bf16 autocast (the learners' ``autocast()``), which would otherwise run
    these matmuls in bf16."""
    return torch.autocast(t.device.type, enabled=False)


def _matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16's range cannot hold x^2 of large activations: use float32 there.
    return torch.float32 if dtype == torch.float16 else dtype


def _output_std(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, c: float
) -> torch.Tensor:
    """Standard deviation of ``x W^T`` for ``W`` with elementwise log-variance ``scale*b@a + c``.

    ``var_j = sum_i x_i^2 exp(lv_ji) = exp(c + m_j) * sum_i x_i^2 exp(scale*(b@a)_ji - m_j)`` with
    ``m_j`` the row maximum of ``scale*b@a`` (a constant for autograd: the sum does not depend on
    it). The factored matrix has values in (0, 1], so the matmul runs in the compute dtype
    (``x``'s; float32 for float16): all terms are positive, so bf16 inputs with float32
    accumulation give a relative error of about 2^-8, and no value under- or overflows.
    The log-variance itself is built in float32 from the factors.
    """
    dt = _matmul_dtype(x.dtype)
    lv = b.float() @ (a.float() * scale)  # scale * B A, [d_out, d_in]
    m = lv.detach().amax(dim=1, keepdim=True)
    rel_var = torch.exp(lv - m).to(dt)
    var = F.linear(x.to(dt).square(), rel_var)  # [..., d_out]
    k = torch.exp(0.5 * (m.squeeze(1) + c)).to(dt)  # sqrt(exp(c + m_j))
    return (var.clamp_min(_VAR_FLOOR).sqrt() * k).to(x.dtype)


def _output_noise(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, c: float
) -> torch.Tensor:
    """``eps * std`` of local reparameterisation; run under ``checkpoint``, which restores the RNG
    state before recomputing, so the backward sees the forward's ``eps``."""
    std = _output_std(x, a, b, scale, c)
    return std * torch.randn_like(std)


def _draw_seed() -> int:
    """A seed from the global (CPU) generator: reproducible under ``torch.manual_seed``, and
    restored by ``torch.utils.checkpoint`` when an enclosing layer is recomputed."""
    return int(torch.randint(0, 2**62, (1,)).item())


def _weight_noise(
    a: torch.Tensor, b: torch.Tensor, scale: float, c: float, seed: int
) -> torch.Tensor:
    """``exp(lv / 2) * eps`` in float32, ``lv = scale*b@a + c``, ``eps`` drawn from ``seed``."""
    gen = torch.Generator(device=a.device)
    gen.manual_seed(seed)
    eps = torch.randn(b.shape[0], a.shape[1], generator=gen, device=a.device, dtype=torch.float32)
    with _float32_only(a):
        std = torch.mm(b.float(), a.float() * (0.5 * scale)).add_(0.5 * c).exp_()  # exp(lv / 2)
    return eps.mul_(std)


class _SampledWeightLinear(torch.autograd.Function):
    """``x (W0 + N)^T`` with ``N = exp(lv / 2) * eps`` one weight-noise sample, ``lv = scale*b@a + c``.

    Keeps ``x``, ``W0`` (a parameter), the factors and the seed of ``eps``; the backward
    regenerates ``eps`` from the seed, so no dense d_out x d_in tensor outlives the call.
    ``fold``: ``W0 + N`` as one matrix in ``x``'s dtype (float32: ``W0`` resolves the noise);
    otherwise the noise has its own matmul in the forward and the backward (bf16).
    """

    @staticmethod
    def forward(ctx, x, weight, a, b, scale: float, c: float, seed: int, fold: bool):
        noise = _weight_noise(a, b, scale, c, seed)
        if fold:
            out = F.linear(x, noise.add_(weight).to(x.dtype))
        else:
            out = F.linear(x, weight) + F.linear(x, noise.to(x.dtype))
        ctx.save_for_backward(x, weight, a, b)
        ctx.scale, ctx.c, ctx.seed, ctx.fold = scale, c, seed, fold
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, a, b = ctx.saved_tensors
        noise = _weight_noise(a, b, ctx.scale, ctx.c, ctx.seed)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            x2 = x.reshape(-1, x.shape[-1])
            # dL/dlv = dL/dN * dN/dlv = (g^T x) * N / 2; then lv = scale * b @ a + c.
            grad_lv = (g2.t() @ x2).float().mul_(noise).mul_(0.5 * ctx.scale)
            if ctx.needs_input_grad[2]:
                grad_a = (b.float().t() @ grad_lv).to(a.dtype)
            if ctx.needs_input_grad[3]:
                grad_b = (grad_lv @ a.float().t()).to(b.dtype)
            del grad_lv
        if ctx.needs_input_grad[0]:
            if ctx.fold:
                grad_x = grad_out @ noise.add_(weight).to(grad_out.dtype)
            else:
                grad_x = grad_out @ weight + grad_out @ noise.to(grad_out.dtype)
        return grad_x, None, grad_a, grad_b, None, None, None, None


def gaussian_lora_modules(model: nn.Module) -> Iterator[Tuple[str, GaussianLoRALinear]]:
    """All ``GaussianLoRALinear`` layers of a model, with their qualified names."""
    for name, module in model.named_modules():
        if isinstance(module, GaussianLoRALinear):
            yield name, module


def set_c_from_base_weights(model: nn.Module, relative_std: float) -> dict:
    """Per layer, ``c = 2 log(relative_std * std(W0))``: at initialisation (B = 0, so every
    log-variance is c) a weight sample's noise std is ``relative_std`` times the spread of that
    layer's pretrained weights, instead of one fixed c for every layer (the paper calls c
    "dependent on the spread of pretrained LLM weights"). Call it after the base weights are
    loaded. Returns {layer name: c}."""
    if not relative_std > 0:
        raise ValueError(f"c_relative_std must be > 0, got {relative_std}")
    from abmll.modules.names import clean_name

    out = {}
    for name, layer in gaussian_lora_modules(model):
        spread = layer.weight.detach().float().std().item()
        if not spread > 0:
            raise ValueError(f"{clean_name(name)}: its base weight has no spread (std {spread}); set model.c instead")
        layer.c = 2.0 * math.log(relative_std * spread)
        out[clean_name(name)] = layer.c
    return out


def set_gaussian_sampling(model: nn.Module, sampling: str) -> None:
    """Choose every Gaussian LoRA layer's training estimator, ``"local"`` or ``"weight"``."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    for _, module in gaussian_lora_modules(model):
        module.sampling = sampling


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def set_gaussian_mode(model: nn.Module, mode: str) -> None:
    """Switch every Gaussian LoRA layer between ``"sample"`` and ``"mean"``, for good.

    Prefer :func:`gaussian_mode`, which puts the previous modes back.
    """
    _check_mode(mode)
    for _, module in gaussian_lora_modules(model):
        module.mode = mode


@contextlib.contextmanager
def gaussian_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Temporarily put every Gaussian LoRA layer of ``model`` in ``mode`` (``"sample"`` or
    ``"mean"``), in the manner of torchtune's ``disable_adapter``.

    On exit, also on an exception, each layer gets back the mode it had on entry (not a fixed
    ``"sample"``), so nested uses and callers that had chosen a mode are left as they were.
    A model without Gaussian layers is left untouched.

    Example:
        >>> with gaussian_mode(model, "mean"):
        ...     logits = model(tokens)  # deterministic: W = W0 + mu_phi
    """
    _check_mode(mode)  # before anything changes
    previous = [(module, module.mode) for _, module in gaussian_lora_modules(model)]
    try:
        for module, _ in previous:
            module.mode = mode
        yield
    finally:
        for module, old in previous:
            module.mode = old
