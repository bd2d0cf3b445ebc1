"""Per-example uncertainty and the metrics made from it: the predictive decomposed, selective
prediction (risk-coverage), and a temperature-scaling control.

All functions take option probabilities ``probs`` [N, C] (rows sum to one over an example's
options; options it does not have carry 0) or per-sample probabilities ``samples`` [S, N, C],
and integer ``labels`` [N]. Computed in float64.

* **Decomposition** (Depeweg et al., 2018): the predictive is the mean over weight samples;
  its entropy (total uncertainty) = the mean of the samples' entropies (expected, aleatoric)
  + the mutual information between the prediction and the weights (epistemic). With one
  sample, or in mean mode, the mutual information is 0 by construction.
* **Selective prediction**: examples ranked by their predictive's top probability, most
  confident first (ties keep the examples' order: a stable sort). At coverage k/N the risk is
  the error rate of the top k. AURC is the mean of the risk over k = 1..N (Geifman et al.,
  2019); accuracy at coverage f is the accuracy of the top ceil(f * N) examples.
* **Temperature scaling** (Guo et al., 2017), one temperature per task, fitted by NLL on that
  task's support examples after adaptation (the only labels a few-shot user has):
  ``p_T = softmax(log p / T)``, which for one sample is ``softmax(logits / T)`` over the options.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

__all__ = [
    "COVERAGES",
    "entropy",
    "decompose",
    "risk_coverage",
    "aurc",
    "accuracy_at_coverage",
    "selective_metrics",
    "abstentions",
    "apply_temperature",
    "fit_temperature",
    "TEMPERATURE_GRID",
]

#: Coverages at which selective accuracy is reported (``acc_at_50`` ...).
COVERAGES: Tuple[float, ...] = (0.5, 0.8, 0.9)
#: Temperatures searched by :func:`fit_temperature`: 601 log-spaced values from 0.05 to 20.
TEMPERATURE_GRID = torch.logspace(math.log10(0.05), math.log10(20.0), 601, dtype=torch.float64)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) over the last dimension, with 0 log 0 = 0."""
    p = probs.double()
    return -(p * torch.log(p.clamp_min(1e-300))).sum(-1)  # p = 0 contributes 0 * finite = 0


def decompose(samples: torch.Tensor) -> Dict[str, torch.Tensor]:
    """``samples`` [S, N, C] -> the predictive [N, C] and, per example, its top probability,
    predictive entropy, expected entropy over the samples and mutual information."""
    s = samples.double()
    predictive = s.mean(0)
    total = entropy(predictive)
    expected = entropy(s).mean(0)
    return {
        "probs": predictive,
        "max_prob": predictive.max(-1).values,
        "entropy": total,
        "expected_entropy": expected,
        # Non-negative in exact arithmetic (Jensen); clamp the rounding below zero.
        "mutual_info": (total - expected).clamp_min(0.0),
    }


def _ranked_errors(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """0/1 errors ordered by the predictive's top probability, most confident first (stable)."""
    conf, pred = probs.double().max(-1)
    order = torch.sort(conf, descending=True, stable=True).indices
    return (pred != labels).double()[order]


def risk_coverage(probs: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(coverage k/N, risk of the k most confident) for k = 1..N."""
    errors = _ranked_errors(probs, labels)
    k = torch.arange(1, errors.numel() + 1, dtype=torch.float64)
    return k / errors.numel(), errors.cumsum(0) / k


def aurc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the risk-coverage curve: the mean risk over k = 1..N (lower is better)."""
    return risk_coverage(probs, labels)[1].mean().item()


def accuracy_at_coverage(probs: torch.Tensor, labels: torch.Tensor, coverage: float) -> float:
    """Accuracy of the ceil(coverage * N) most confident examples (at least one)."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    errors = _ranked_errors(probs, labels)
    k = max(1, math.ceil(coverage * errors.numel() - 1e-9))
    return 1.0 - errors[:k].mean().item()


def abstentions(probs: torch.Tensor, *, below: Optional[float] = None, coverage: Optional[float] = None) -> torch.Tensor:
    """Which examples to abstain on (bool [N]): those whose top probability is below ``below``,
    or all but the ceil(coverage * N) most confident (the ranking of the selective metrics, ties
    in the examples' order). Neither given: none."""
    conf = probs.double().max(-1).values
    if below is not None and coverage is not None:
        raise ValueError("give a probability threshold or a coverage, not both")
    if below is not None:
        if not 0.0 <= below <= 1.0:
            raise ValueError(f"the abstention threshold must be in [0, 1], got {below}")
        return conf < below
    out = torch.zeros(conf.numel(), dtype=torch.bool)
    if coverage is not None:
        if not 0.0 < coverage <= 1.0:
            raise ValueError(f"coverage must be in (0, 1], got {coverage}")
        k = max(1, math.ceil(coverage * conf.numel() - 1e-9))
        out[torch.sort(conf, descending=True, stable=True).indices[k:]] = True
    return out


def selective_metrics(probs: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """``aurc`` and ``acc_at_50`` / ``acc_at_80`` / ``acc_at_90``."""
    out = {"aurc": aurc(probs, labels)}
    for c in COVERAGES:
        out[f"acc_at_{round(100 * c)}"] = accuracy_at_coverage(probs, labels, c)
    return out


def apply_temperature(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(log p / T)`` over each row; options with probability 0 stay 0."""
    logp = torch.log(probs.double())
    return torch.softmax(logp / float(temperature), dim=-1)


def fit_temperature(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature in :data:`TEMPERATURE_GRID` that minimises the NLL of ``labels`` under
    ``apply_temperature(probs, T)`` (the first of equal minima: deterministic)."""
    logp = torch.log(probs.double().clamp_min(1e-300)).where(probs > 0, torch.tensor(float("-inf"), dtype=torch.float64))
    scaled = logp.unsqueeze(0) / TEMPERATURE_GRID.view(-1, 1, 1)  # [T, N, C]
    nll = -torch.log_softmax(scaled, dim=-1).gather(
        -1, labels.view(1, -1, 1).expand(len(TEMPERATURE_GRID), -1, 1)
    ).squeeze(-1).mean(-1)
    return TEMPERATURE_GRID[int(torch.argmin(nll))].item()
