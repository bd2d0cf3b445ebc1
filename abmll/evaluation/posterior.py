"""Does the posterior matter? What the learned variances are, next to the weights they perturb.

:func:`posterior_summary` reads every ``GaussianLoRALinear`` of a model (the adapters as they
are: the best epoch's global θ and φ at the end of a run) and reports, per adapted layer and
over all of them, the 1% / 50% / 99% quantiles of

* the learned log-variances ``lv_θ`` and ``lv_φ`` (elementwise over the weight), against ``c``;
* the relative noise of a weight sample, ``exp(lv_φ / 2) / |W0 + μ_φ|``;
* ``lv_φ - c``, how far the variances moved from their start (c may differ per layer).

The flip rate (how often one sample and the mean mode disagree) is measured at test time, by
:func:`abmll.evaluation.evaluate_unseen_tasks`, and added to the same block by the recipe.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from abmll.modules import gaussian_lora_modules
from abmll.modules.names import clean_name

__all__ = ["QUANTILES", "quantiles", "posterior_summary"]

QUANTILES = (0.01, 0.5, 0.99)
#: Per layer, at most this many elements enter the pooled "all layers" quantiles (an evenly
#: strided subset; Llama3-8B's 96 adapted layers would otherwise need 1.6e9 values).
_POOL_PER_LAYER = 1 << 18


def quantiles(values: torch.Tensor, qs: Iterable[float] = QUANTILES) -> Dict[str, float]:
    """Linear-interpolation quantiles (as ``numpy.quantile``'s default) of a flattened tensor,
    by sorting: ``torch.quantile`` refuses more than 2**24 elements (one 4096 x 4096 layer)."""
    flat = torch.sort(values.detach().double().flatten()).values
    n = flat.numel()
    out = {}
    for q in qs:
        pos = q * (n - 1)
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        out[f"q{round(100 * q):02d}"] = (flat[lo] + (pos - lo) * (flat[hi] - flat[lo])).item()
    return out


def _strided(t: torch.Tensor) -> torch.Tensor:
    flat = t.flatten()
    step = max(1, flat.numel() // _POOL_PER_LAYER)
    return flat[::step]


@torch.no_grad()
def posterior_summary(model: nn.Module) -> Optional[Dict[str, object]]:
    """The block ``results.json`` keeps under ``posterior`` (None for a model without Gaussian
    layers): ``c``, ``layers`` {name: {lv_theta, lv_phi, rel_noise_std}}, ``all`` (pooled)."""
    layers: Dict[str, Dict[str, Dict[str, float]]] = {}
    pooled: Dict[str, List[torch.Tensor]] = {"lv_theta": [], "lv_phi": [], "rel_noise_std": [],
                                             "lv_phi_minus_c": []}
    cs = set()
    for name, layer in gaussian_lora_modules(model):
        cs.add(layer.c)
        lv_theta = layer.dense("lv_theta").float()
        lv_phi = layer.dense("lv_phi").float()
        mean_w = layer.weight.float() + layer.dense("mu_phi").float()
        rel = torch.exp(0.5 * lv_phi) / mean_w.abs().clamp_min(1e-30)
        # lv_phi - c: how far the learned variances moved from where they started, comparable
        # across layers when c differs between them (c_relative_std).
        stats = {"lv_theta": lv_theta, "lv_phi": lv_phi, "rel_noise_std": rel, "lv_phi_minus_c": lv_phi - layer.c}
        layers[clean_name(name)] = {"c": layer.c, **{k: quantiles(v) for k, v in stats.items()}}
        for k, v in stats.items():
            pooled[k].append(_strided(v))
    if not layers:
        return None
    return {
        "c": cs.pop() if len(cs) == 1 else sorted(cs),
        "quantiles": [f"q{round(100 * q):02d}" for q in QUANTILES],
        "all": {k: quantiles(torch.cat(v)) for k, v in pooled.items()},
        "layers": layers,
    }
