"""Put ``GaussianLoRALinear`` on the attention projections of any torchtune decoder."""

from __future__ import annotations

from typing import List, Sequence

from torch import nn
from torchtune.modules import MultiHeadAttention

from abmll.modules import DEFAULT_C, DEFAULT_SAMPLING, GaussianLoRALinear
from abmll.modules.gaussian_lora import SAMPLINGS

ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "output_proj")
#: The paper's Table 5: LoRA on the query, value and output projections.
DEFAULT_LORA_ATTN_MODULES: List[str] = ["q_proj", "v_proj", "output_proj"]


def check_sampling(sampling: str) -> None:
    """Refuse an unknown ``model.sampling`` in one line naming the key (the builders call this
    before building the base model, so a typo costs no 8B build)."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"model.sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")


def add_gaussian_lora(
    model: nn.Module,
    lora_attn_modules: Sequence[str] = tuple(DEFAULT_LORA_ATTN_MODULES),
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    c: float = DEFAULT_C,
    sampling: str = DEFAULT_SAMPLING,
) -> nn.Module:
    """Swap the named projections of every attention block for ``GaussianLoRALinear``.

    ``sampling`` is every layer's training-time estimator (the config's ``model.sampling``):
    ``"weight"`` (one weight sample per forward call, shared by the batch: the paper's "one
    sample from the reparameterization step"; the default, docs/notes.md note 30) or ``"local"``
    (local reparameterisation, independent output noise per token). See :mod:`abmll.modules.gaussian_lora`.

    The base ``nn.Linear``'s weight (and bias) become the frozen ``W0`` of the new layer
    without a copy, so this works on the meta device and keeps state-dict keys
    (``...attn.q_proj.weight``) identical to torchtune's, which lets torchtune's
    checkpointers load base weights unchanged.
    """
    unknown = sorted(set(lora_attn_modules) - set(ATTN_PROJECTIONS))
    if unknown or not lora_attn_modules:
        raise ValueError(
            f"model.lora_attn_modules must be a non-empty subset of {list(ATTN_PROJECTIONS)}, "
            f"got {list(lora_attn_modules)}"
        )
    check_sampling(sampling)
    n_swapped = 0
    for attn in [m for m in model.modules() if isinstance(m, MultiHeadAttention)]:
        for name in lora_attn_modules:
            base = getattr(attn, name)
            if not isinstance(base, nn.Linear):
                raise TypeError(f"{name} is {type(base).__name__}, expected nn.Linear")
            layer = GaussianLoRALinear(
                in_dim=base.in_features,
                out_dim=base.out_features,
                rank=lora_rank,
                alpha=lora_alpha,
                c=c,
                use_bias=base.bias is not None,
                sampling=sampling,
            )
            layer.weight = nn.Parameter(base.weight.data, requires_grad=False)
            if base.bias is not None:
                layer.bias = nn.Parameter(base.bias.data, requires_grad=False)
            setattr(attn, name, layer)
            n_swapped += 1
    if n_swapped == 0:
        raise ValueError("add_gaussian_lora found no torchtune MultiHeadAttention in the model")
    return model
