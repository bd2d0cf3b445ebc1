"""The terms of the ABMLL objective (paper Eq. 2) as pure functions.

- ``answer_nll``: -log p(D | phi) on the answer tokens only.
- ``gaussian_kl``: KL(q(phi|D) || p(phi|theta)) for diagonal Gaussians, summed.
- ``neg_log_prior``: -log p(theta) = -log N(mu_theta; 0, 1) - log Gamma(exp(-lv_theta); a0, b0),
  summed (Ravi & Beatson's simplification of KL(q(theta) || p(theta)); no Jacobian term).
- ``model_kl`` / ``model_kl_and_neg_log_prior`` (what training calls): the same summed over
  every ``GaussianLoRALinear`` of a model, built from the low-rank factors in row chunks, so
  that at most one chunk of one layer's dense d_out x d_in matrices exists at a time; their
  gradients are computed analytically in the same pass (no recomputation in the backward).

``gaussian_kl`` and ``neg_log_prior`` are the readable formulas on dense matrices: training does
not call them; they are the references the fused kernel is tested against
(``tests/test_objectives.py``), themselves tested against ``torch.distributions``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from abmll.modules import PHI_PAIRS, THETA_PAIRS, gaussian_lora_modules

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


def option_logits_at(
    model: nn.Module, hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, option_ids: torch.Tensor
) -> torch.Tensor:
    """Float32 logits of the option tokens alone, [N, C], at positions ``(rows[i], cols[i])``.

    Computed in float32 from the hidden state and the options' rows of the output weight,
    whatever the compute dtype. A bf16 matmul rounds its output to bf16, so answer logits of
    magnitude 8-32 move in steps of 0.06-0.125: options tie exactly (82 of the 480 answers of
    the offline default's ABMLL run in bf16, each broken towards the first option) and a change
    at the level of bf16's rounding moves an answer a whole step. C rows cost nothing next to
    the vocabulary; an output projection other than ``nn.Linear`` or torchtune's ``TiedLinear``
    (e.g. one with LoRA) is applied as it is and its logits upcast.
    """
    out = model.output
    tied = getattr(out, "tied_module", None)
    if tied is not None:  # TiedLinear: the token embedding's weight, no bias
        weight, bias = tied.weight, None
    elif type(out) is nn.Linear:
        weight, bias = out.weight, out.bias
    else:
        return logits_at(model, hidden, rows, cols).index_select(-1, option_ids.to(hidden.device))
    ids = option_ids.to(weight.device)
    with torch.autocast(hidden.device.type, enabled=False):
        return F.linear(hidden[rows, cols].float(), weight[ids].float(),
                        None if bias is None else bias[ids].float())


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
#
# Per layer, one pass over row chunks of the dense matrices computes the KL and -log p(theta)
# together with their analytic gradients with respect to the low-rank factors that need one
# (``KLPriorFunction``); the backward only scales those by the incoming gradients. Nothing is
# recomputed, no autograd graph over dense matrices is built, and per chunk three dense
# float32 matrices are formed from the factors (rank-2r products where a difference is needed):
#
#     dmu = mu_phi - mu_theta = s [B_mq, -B_mp] [A_mq; A_mp]      (c and W0 cancel)
#     dlv = lv_phi - lv_theta = s [B_lq, -B_lp] [A_lq; A_lp]
#     lv_p = lv_theta        = s B_lp A_lp + c
#
#     KL    = 1/2 sum(exp(dlv) - 1 - dlv + dmu^2 exp(-lv_p))
#     prior = 1/2 ||s B_mp A_mp||_F^2 + n (log(2 pi)/2 - a0 log b0 + lgamma a0)
#             + (a0 - 1) sum(lv_p) + b0 sum(exp(-lv_p))
#
# (||s B A||_F^2 = s^2 tr((B^T B)(A A^T)) and sum(lv_p) = s 1^T B A 1 + c n are low-rank).
# Dense gradients: dKL/dmu_q = dmu exp(-lv_p) = -dKL/dmu_p, dKL/dlv_q = (exp(dlv) - 1)/2,
# dKL/dlv_p = -(exp(dlv) - 1)/2 - dmu^2 exp(-lv_p)/2, dprior/dlv_p = a0 - 1 - b0 exp(-lv_p);
# each goes to its factors as dB = s G A^T, dA = s B^T G.

#: Order of the factors ``KLPriorFunction`` takes (each pair as ``(B, A)``): phi's, then theta's.
_KL_ORDER = PHI_PAIRS + THETA_PAIRS


def _row_chunks(n_rows: int, chunk_rows: int):
    step = max(1, int(chunk_rows))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _chain(g: torch.Tensor, b: torch.Tensor, a_s: torch.Tensor, rows: slice, grads, ib: int, sign: float = 1.0):
    """Add the factor gradients of a dense gradient ``g`` (rows ``rows``) of ``s B A``:
    ``dB[rows] += s g A^T`` (``a_s`` is ``s A``) and ``dA += B[rows]^T g`` (times s later)."""
    gb, ga = grads[ib], grads[ib + 1]
    if gb is not None:
        gb[rows].addmm_(g, a_s.t(), alpha=sign)
    if ga is not None:
        ga.addmm_(b[rows].t(), g, alpha=sign)


class KLPriorFunction(torch.autograd.Function):
    """``[KL(q(phi)||p(phi|theta)), -log p(theta)]`` of one layer, from its eight factors.

    ``forward(ctx, opts, b_mq, a_mq, b_lq, a_lq, b_mp, a_mp, b_lp, a_lp)`` with
    ``opts = (scale, c, a0, b0, chunk_rows, want_kl, want_prior, need)``: ``need`` says which
    factors get gradients (``torch.is_grad_enabled()`` and ``requires_grad``, decided by the
    caller). Returns a float32 tensor of shape (2,); a term not wanted is 0. The gradients are
    computed in the forward, one row chunk at a time, and saved in float32 (the factors' sizes).
    """

    @staticmethod
    def forward(ctx, opts, b_mq, a_mq, b_lq, a_lq, b_mp, a_mp, b_lp, a_lp):
        scale, c, a0, b0, chunk_rows, want_kl, want_prior, need = opts
        factors = (b_mq, a_mq, b_lq, a_lq, b_mp, a_mp, b_lp, a_lp)
        f = [t.float() for t in factors]
        bmq, amq, blq, alq, bmp, amp, blp, alp = f
        d_out, d_in = bmq.shape[0], amq.shape[1]
        need_kl = tuple(bool(n and want_kl) for n in need)
        need_pr = tuple(bool(n and want_prior) for n in need[4:])
        gk = [torch.zeros_like(t) if n else None for t, n in zip(f, need_kl)]
        gp = [torch.zeros_like(t) if n else None for t, n in zip(f[4:], need_pr)]
        alp_s = alp * scale
        if want_kl:
            a_mu = torch.cat([amq, amp]) * scale
            a_lv = torch.cat([alq, alp]) * scale
            amq_s, amp_s, alq_s = a_mu[: amq.shape[0]], a_mu[amq.shape[0]:], a_lv[: alq.shape[0]]
        kl = torch.zeros((), dtype=torch.float32, device=bmq.device)
        prior = torch.zeros((), dtype=torch.float32, device=bmq.device)
        for rows in _row_chunks(d_out, chunk_rows):
            n = (rows.stop - rows.start) * d_in
            p_exp = torch.mm(blp[rows], alp_s).add_(c).neg_().exp_()  # exp(-lv_p)
            if want_prior:
                sum_lvp = scale * torch.dot(blp[rows].sum(0), alp.sum(1)) + c * n
                prior = prior + b0 * p_exp.sum() + (a0 - 1.0) * sum_lvp
            if want_kl:
                dmu = torch.mm(torch.cat([bmq[rows], -bmp[rows]], 1), a_mu)
                g_mu = dmu * p_exp  # dKL/dmu_q
                dlv = torch.mm(torch.cat([blq[rows], -blp[rows]], 1), a_lv)
                kl = kl + 0.5 * (torch.dot(dmu.flatten(), g_mu.flatten()) - dlv.sum() - n)
                g_lvq = dlv.exp_()  # in place (exp is vectorised on CPU, expm1 is not)
                kl = kl + 0.5 * g_lvq.sum()
                g_lvq.sub_(1.0).mul_(0.5)  # dKL/dlv_q = (exp(dlv) - 1) / 2
                _chain(g_mu, bmq, amq_s, rows, gk, 0)
                _chain(g_mu, bmp, amp_s, rows, gk, 4, sign=-1.0)
                _chain(g_lvq, blq, alq_s, rows, gk, 2)
                if need_kl[6] or need_kl[7]:
                    g_lvp = dmu.mul_(g_mu).mul_(-0.5).sub_(g_lvq)  # dKL/dlv_p, in dmu's memory
                    _chain(g_lvp, blp, alp_s, rows, gk, 6)
                del dmu, g_mu, dlv, g_lvq
            if need_pr[2] or need_pr[3]:
                g_pr = p_exp.mul_(-b0).add_(a0 - 1.0)  # dprior/dlv_p, in p_exp's memory
                _chain(g_pr, blp, alp_s, rows, gp, 2)
            del p_exp
        # dA = s B^T G: the chained A gradients were accumulated without s.
        for g in (gk[1], gk[3], gk[5], gk[7], gp[3]):
            if g is not None:
                g.mul_(scale)
        if want_prior:  # 1/2 ||s B A||_F^2 and the constants
            gram_b, gram_a = bmp.t() @ bmp, amp @ amp.t()
            prior = prior + 0.5 * scale**2 * torch.sum(gram_b * gram_a)
            prior = prior + d_out * d_in * (_HALF_LOG_2PI - a0 * math.log(b0) + math.lgamma(a0))
            if gp[0] is not None:
                gp[0].add_(bmp @ gram_a, alpha=scale**2)
            if gp[1] is not None:
                gp[1].add_(gram_b @ amp, alpha=scale**2)
        grads = gk + gp  # float32; cast to the factors' dtypes once scaled, in the backward
        ctx.present = [g is not None for g in grads]
        ctx.dtypes = [t.dtype for t in factors]
        ctx.save_for_backward(*[g for g in grads if g is not None])
        return torch.stack([kl, prior])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if present else None for present in ctx.present]
        gk, gp = grads[:8], grads[8:]
        g_kl, g_prior = grad_out.float().unbind()
        result = []
        for i in range(8):
            g = None
            if gk[i] is not None:
                g = gk[i] * g_kl
            if i >= 4 and gp[i - 4] is not None:
                g = gp[i - 4] * g_prior if g is None else g.add_(gp[i - 4] * g_prior)
            result.append(None if g is None else g.to(ctx.dtypes[i]))
        return (None, *result)


def _layer_terms(m, a0: float, b0: float, chunk_rows: int, want_kl: bool, want_prior: bool) -> torch.Tensor:
    factors = [t for name in _KL_ORDER for t in m.factors(name)]
    grad_on = torch.is_grad_enabled()
    need = tuple(grad_on and t.requires_grad for t in factors)
    opts = (m.scale, m.c, float(a0), float(b0), int(chunk_rows), want_kl, want_prior, need)
    return KLPriorFunction.apply(opts, *factors)


def _model_terms(model: nn.Module, a0: float, b0: float, chunk_rows: int, want_kl: bool,
                 want_prior: bool, caller: str) -> torch.Tensor:
    total = None
    for _, m in gaussian_lora_modules(model):
        part = _layer_terms(m, a0, b0, chunk_rows, want_kl, want_prior)
        total = part if total is None else total + part
    if total is None:
        raise ValueError(f"{caller}: the model has no GaussianLoRALinear layers")
    return total


def model_kl_and_neg_log_prior(
    model: nn.Module, a0: float, b0: float, chunk_rows: int = 1024
) -> tuple:
    """``(model_kl(model), -log p(theta) summed like it)`` from one pass over each row chunk of
    each layer (the global pairs' dense matrices are built once for both)."""
    both = _model_terms(model, a0, b0, chunk_rows, True, True, "model_kl_and_neg_log_prior")
    return both[0], both[1]


def model_kl(model: nn.Module, chunk_rows: int = 1024) -> torch.Tensor:
    """KL(q(phi|D) || p(phi|theta)) summed over every weight of every Gaussian LoRA layer.

    W0 cancels. At most one row chunk of one layer's dense matrices exists at a time; the
    gradients are computed in the same pass (see ``KLPriorFunction``).
    """
    return _model_terms(model, 1.0, 1.0, chunk_rows, True, False, "model_kl")[0]

