"""Classification metrics from class probabilities over the options of each question.

All take ``probs`` of shape [N, C] (rows sum to one over the example's options; options
an example does not have carry probability 0) and integer ``labels`` of shape [N].
"""

from __future__ import annotations

from typing import Dict

import torch


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return (probs.argmax(dim=-1) == labels).double().mean().item()


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor) -> float:
    p = probs.double().gather(1, labels.view(-1, 1)).squeeze(1)
    return (-torch.log(p.clamp_min(1e-12))).mean().item()


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multi-class Brier score: mean over examples of sum_k (p_k - 1[k = y])^2."""
    onehot = torch.nn.functional.one_hot(labels, probs.size(-1)).double()
    return (probs.double() - onehot).square().sum(dim=-1).mean().item()


def expected_calibration_error(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15
) -> float:
    """Top-label ECE with ``n_bins`` equal-width confidence bins, l1, as a fraction.

    ECE = sum_b (|B_b| / N) * |acc(B_b) - conf(B_b)|, where bin b holds the examples whose
    top probability lies in ((b-1)/n_bins, b/n_bins] (the first bin also takes 0).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    probs = probs.double()
    conf, pred = probs.max(dim=-1)
    correct = (pred == labels).double()
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    # bucketize(right=False) puts conf == edge_k into bin k-1: bins are right-closed.
    bins = (torch.bucketize(conf, edges[1:-1], right=False)).clamp(0, n_bins - 1)
    n = conf.numel()
    ece = torch.zeros((), dtype=torch.float64)
    for b in range(n_bins):
        in_bin = bins == b
        count = int(in_bin.sum())
        if count:
            ece += (count / n) * (correct[in_bin].mean() - conf[in_bin].mean()).abs()
    return ece.item()


def classification_metrics(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15
) -> Dict[str, float]:
    from abmll.evaluation.uncertainty import selective_metrics

    return {
        "accuracy": accuracy(probs, labels),
        "ece": expected_calibration_error(probs, labels, n_bins),
        "nll": negative_log_likelihood(probs, labels),
        "brier": brier_score(probs, labels),
        **selective_metrics(probs, labels),  # aurc, acc_at_50/80/90 (ranked by top probability)
        "n": int(labels.numel()),
    }


def option_probs(
    answer_logits: torch.Tensor, option_ids: torch.Tensor, num_options: torch.Tensor
) -> torch.Tensor:
    """Softmax of the next-token logits restricted to the option letters.

    ``answer_logits`` [B, V] are the logits at the position before the answer token,
    ``option_ids`` [C] the token ids of the letters A, B, ..., ``num_options`` [B] how many
    options each example has; letters beyond that get probability 0. Float32.
    """
    return masked_option_softmax(answer_logits.float().index_select(-1, option_ids.to(answer_logits.device)),
                                 num_options)


def masked_option_softmax(option_logits: torch.Tensor, num_options: torch.Tensor) -> torch.Tensor:
    """Softmax over each example's options, [B, C] logits of the letters A, B, ...; letters
    beyond ``num_options`` [B] get probability 0. Float32."""
    logits = option_logits.float()
    letters = torch.arange(logits.size(-1), device=logits.device)
    mask = letters.unsqueeze(0) >= num_options.to(logits.device).unsqueeze(1)
    return torch.softmax(logits.masked_fill(mask, float("-inf")), dim=-1)
