"""Magnitude pruning of hidden units, for the paper's robustness test (Table 2).

Reading of "a percentage of neurons in each layer embedding is set to zero, sorted by
magnitudes": a *neuron* is one of the ``d_model`` units of the embedding that a
transformer block outputs (the residual stream after the block); its *magnitude* is
the absolute value of its activation for the token at hand. In every block, for every
token, the ``fraction`` of units with the smallest magnitude is set to zero. Nothing is
changed in the weights; the hooks are removed on exit.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn
from torchtune.modules import TransformerSelfAttentionLayer


def num_pruned(fraction: float, width: int) -> int:
    """Units zeroed per token: ``ceil(fraction * width)`` (so 1% of 576 is 6)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval.prune_fractions: each fraction must be in [0, 1), got {fraction}")
    return math.ceil(fraction * width - 1e-9)


@contextlib.contextmanager
def prune_hidden_units(model: nn.Module, fraction: float) -> Iterator[None]:
    """Within the block, every transformer layer's output has its smallest ``fraction`` of
    units (by absolute value, per token) set to zero."""
    layers = [m for m in model.modules() if isinstance(m, TransformerSelfAttentionLayer)]
    if fraction < 0 or fraction >= 1:
        num_pruned(fraction, 1)  # raises with the config key
    if fraction == 0 or not layers:
        yield
        return

    def hook(module, inputs, output):
        k = num_pruned(fraction, output.size(-1))
        idx = output.abs().topk(k, dim=-1, largest=False).indices
        return output.scatter(-1, idx, torch.zeros((), dtype=output.dtype, device=output.device).expand_as(idx))

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
