"""The terms of the ABMLL objective (paper Eq. 2) as pure functions.

- ``answer_nll``: -log p(D | phi) on the answer tokens only.
- ``gaussian_kl``: KL(q(phi|D) || p(phi|theta)) for diagonal Gaussians, summed.
- ``neg_log_prior``: -log p(theta) = -log N(mu_theta; 0, 1) - log Gamma(exp(-lv_theta); a0, b0),
  summed (Ravi & Beatson's simplification of KL(q(theta) || p(theta)); no Jacobian term).
- ``model_kl`` / ``model_neg_log_prior``: the same summed over every ``GaussianLoRALinear``
  of a model, built from the low-rank factors in row chunks under activation checkpointing,
  so that at most one chunk of one layer's dense d_out x d_in matrices exists at a time,
  in the forward and in the backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from abmll.modules import gaussian_lora_modules

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def answer_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens.

    ``labels`` follow torchtune's convention: aligned with the input tokens (unshifted),
    ``CROSS_ENTROPY_IGNORE_IDX`` everywhere except the answer tokens. Logits at position
    ``t`` predict token ``t + 1``. Computed in float32.
    """
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=CROSS_ENTROPY_IGNORE_IDX,
    )


def final_hidden_states(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Run a torchtune ``TransformerDecoder`` up to its final norm, skipping the output
    projection (the vocabulary-sized matmul is then applied only where it is needed)."""
    # A plain function in the instance dict shadows TransformerDecoder.unembed (a module
    # would be registered as a child instead, and not shadow it).
    model.unembed = lambda h: model.norm(h)
    try:
        return model(tokens)
    finally:
        del model.unembed


def logits_at(model: nn.Module, hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Float32 next-token logits at positions ``(rows[i], cols[i])`` of ``hidden``."""
    return model.output(hidden[rows, cols]).float()


def model_answer_nll(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``answer_nll(model(tokens), labels)`` without the full [B, T, vocab] logits.

    Only the positions that predict an answer token go through the output projection,
    which saves most of its compute and memory (a 128k vocabulary on Llama3).
    """
    targets = labels[:, 1:]
    rows, cols = (targets != CROSS_ENTROPY_IGNORE_IDX).nonzero(as_tuple=True)
    hidden = final_hidden_states(model, tokens)
    return F.cross_entropy(logits_at(model, hidden, rows, cols), targets[rows, cols])


def gaussian_kl(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor
) -> torch.Tensor:
    """Summed closed-form KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p))), elementwise."""
    return 0.5 * torch.sum(
        logvar_p
        - logvar_q
        + (torch.exp(logvar_q) + (mu_q - mu_p).square()) * torch.exp(-logvar_p)
        - 1.0
    )


def neg_log_prior(
    mu: torch.Tensor, logvar: torch.Tensor, a0: float, b0: float
) -> torch.Tensor:
    """Summed -log N(mu; 0, 1) - log Gamma(exp(-logvar); a0, b0) (shape a0, rate b0).

    The Gamma density is evaluated at the precision ``tau = exp(-logvar)``:
    ``log Gamma(tau; a, b) = a log b - lgamma(a) + (a - 1) log tau - b tau``.
    """
    neg_log_normal = 0.5 * mu.square() + _HALF_LOG_2PI
    log_tau = -logvar
    log_gamma = (
        a0 * math.log(b0) - math.lgamma(a0) + (a0 - 1.0) * log_tau - b0 * torch.exp(log_tau)
    )
    return torch.sum(neg_log_normal - log_gamma)


# --- model-level terms, chunked -------------------------------------------------------------


def _dense(b: torch.Tensor, a: torch.Tensor, scale: float, offset: float) -> torch.Tensor:
    return scale * (b.float() @ a.float()) + offset


def _kl_chunk(bmq, amq, blq, alq, bmp, amp, blp, alp, scale: float, c: float) -> torch.Tensor:
    return gaussian_kl(
        _dense(bmq, amq, scale, 0.0),
        _dense(blq, alq, scale, c),
        _dense(bmp, amp, scale, 0.0),
        _dense(blp, alp, scale, c),
    )


def _prior_chunk(bm, am, bl, al, scale: float, c: float, a0: float, b0: float) -> torch.Tensor:
    return neg_log_prior(_dense(bm, am, scale, 0.0), _dense(bl, al, scale, c), a0, b0)


def _row_chunks(n_rows: int, chunk_rows: int):
    step = max(1, int(chunk_rows))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def model_kl(model: nn.Module, chunk_rows: int = 1024) -> torch.Tensor:
    """KL(q(phi|D) || p(phi|theta)) summed over every weight of every Gaussian LoRA layer.

    W0 cancels. Each row chunk of each layer is computed under ``checkpoint`` so its dense
    temporaries are freed after the forward and rebuilt one chunk at a time in the backward.
    """
    total = None
    for _, m in gaussian_lora_modules(model):
        bmq, amq = m.factors("mu_phi")
        blq, alq = m.factors("lv_phi")
        bmp, amp = m.factors("mu_theta")
        blp, alp = m.factors("lv_theta")
        for rows in _row_chunks(m.out_dim, chunk_rows):
            part = checkpoint(
                _kl_chunk,
                bmq[rows], amq, blq[rows], alq, bmp[rows], amp, blp[rows], alp,
                m.scale, m.c,
                use_reentrant=False,
            )
            total = part if total is None else total + part
    if total is None:
        raise ValueError("model_kl: the model has no GaussianLoRALinear layers")
    return total


def model_neg_log_prior(
    model: nn.Module, a0: float, b0: float, chunk_rows: int = 1024
) -> torch.Tensor:
    """-log p(theta) summed over every weight of every Gaussian LoRA layer (global pairs)."""
    total = None
    for _, m in gaussian_lora_modules(model):
        bm, am = m.factors("mu_theta")
        bl, al = m.factors("lv_theta")
        for rows in _row_chunks(m.out_dim, chunk_rows):
            part = checkpoint(
                _prior_chunk, bm[rows], am, bl[rows], al, m.scale, m.c, a0, b0,
                use_reentrant=False,
            )
            total = part if total is None else total + part
    if total is None:
        raise ValueError("model_neg_log_prior: the model has no GaussianLoRALinear layers")
    return total
