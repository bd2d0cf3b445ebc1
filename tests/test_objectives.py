"""The objective's terms against torch.distributions, and the chunked model-level sums
against a dense computation."""

import math

import pytest
import torch
from torch import distributions as D

from abmll.models import gaussian_lora_tiny_llama
from abmll.modules import PAIRS, gaussian_lora_modules
from abmll.objectives import (
    answer_nll,
    gaussian_kl,
    model_kl,
    model_kl_and_neg_log_prior,
    neg_log_prior,
)


def _rand(*shape, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64) * scale


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu_q, lv_q, mu_p, lv_p = _rand(7, 5), _rand(7, 5), _rand(7, 5), _rand(7, 5)
    ref = D.kl_divergence(
        D.Normal(mu_q, torch.exp(0.5 * lv_q)), D.Normal(mu_p, torch.exp(0.5 * lv_p))
    ).sum()
    torch.testing.assert_close(gaussian_kl(mu_q, lv_q, mu_p, lv_p), ref)


def test_gaussian_kl_is_zero_for_equal_distributions_and_positive_otherwise():
    mu, lv = _rand(4, 3), _rand(4, 3)
    assert gaussian_kl(mu, lv, mu, lv).abs().item() < 1e-12
    assert gaussian_kl(mu, lv, mu + 0.1, lv).item() > 0


@pytest.mark.parametrize("a0,b0", [(1.0, 0.01), (2.5, 0.3)])
def test_neg_log_prior_matches_torch_distributions(a0, b0):
    torch.manual_seed(1)
    mu, lv = _rand(6, 4), _rand(6, 4, scale=2.0)
    ref = -(
        D.Normal(0.0, 1.0).log_prob(mu) + D.Gamma(a0, b0).log_prob(torch.exp(-lv))
    ).sum()
    torch.testing.assert_close(neg_log_prior(mu, lv, a0, b0), ref)


def _randomise_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _, layer in gaussian_lora_modules(model):
        for p in layer.pair_params(PAIRS):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _dense_reference(model, a0, b0):
    kl, prior = 0.0, 0.0
    for _, m in gaussian_lora_modules(model):
        kl = kl + gaussian_kl(m.dense("mu_phi"), m.dense("lv_phi"), m.dense("mu_theta"), m.dense("lv_theta"))
        prior = prior + neg_log_prior(m.dense("mu_theta"), m.dense("lv_theta"), a0, b0)
    return kl, prior


@pytest.mark.parametrize("chunk_rows", [1, 7, 4096])
def test_model_kl_and_prior_chunked_equal_dense_values_and_gradients(chunk_rows):
    torch.manual_seed(0)
    model = gaussian_lora_tiny_llama(c=-2.0)
    _randomise_adapters(model)
    params = [p for _, m in gaussian_lora_modules(model) for p in m.pair_params(PAIRS)]

    kl_ref, prior_ref = _dense_reference(model, 1.0, 0.01)
    grads_ref = torch.autograd.grad(kl_ref + 1e-3 * prior_ref, params)

    kl = model_kl(model, chunk_rows=chunk_rows)
    prior = model_kl_and_neg_log_prior(model, 1.0, 0.01, chunk_rows=chunk_rows)[1]
    grads = torch.autograd.grad(kl + 1e-3 * prior, params)

    torch.testing.assert_close(kl, kl_ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(prior, prior_ref, rtol=1e-5, atol=1e-3)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk_rows,c", [(7, -2.0), (4096, -20.0)])
def test_fused_kl_and_prior_equal_the_separate_functions_and_the_dense_reference(chunk_rows, c):
    """Values, and gradients for two different weightings of the two terms (the KL's and the
    prior's gradients are kept apart until the backward)."""
    torch.manual_seed(0)
    model = gaussian_lora_tiny_llama(c=c)
    _randomise_adapters(model, seed=1)
    params = [p for _, m in gaussian_lora_modules(model) for p in m.pair_params(PAIRS)]
    a0, b0 = 2.0, 0.3
    kl_ref, prior_ref = _dense_reference(model, a0, b0)
    for w_kl, w_prior in ((1.0, 1e-3), (-0.5, 2e-3)):
        kl, prior = model_kl_and_neg_log_prior(model, a0, b0, chunk_rows=chunk_rows)
        kl_sep = model_kl(model, chunk_rows=chunk_rows)
        prior_sep = model_kl_and_neg_log_prior(model, a0, b0, chunk_rows=chunk_rows)[1]  # the prior's output alone
        torch.testing.assert_close(kl, kl_ref, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(prior, prior_ref, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(kl, kl_sep)
        torch.testing.assert_close(prior, prior_sep)
        scale = abs(w_prior) * prior_ref.abs().item() + abs(w_kl) * kl_ref.abs().item()
        grads = torch.autograd.grad(w_kl * kl + w_prior * prior, params)
        grads_sep = torch.autograd.grad(w_kl * kl_sep + w_prior * prior_sep, params)
        grads_ref = torch.autograd.grad(w_kl * kl_ref + w_prior * prior_ref, params, retain_graph=True)
        for g, gs, r in zip(grads, grads_sep, grads_ref):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6 * scale)
            torch.testing.assert_close(g, gs, rtol=1e-5, atol=1e-7 * scale)


@pytest.mark.parametrize("trainable", ["phi", "theta"])
def test_kl_and_prior_gradients_reach_only_the_trainable_pairs(trainable):
    """The inner step trains phi only, the outer theta only: the gradients are computed only
    for factors that require them, and equal the dense reference's."""
    from abmll.modules import PHI_PAIRS, THETA_PAIRS

    torch.manual_seed(0)
    model = gaussian_lora_tiny_llama(c=-3.0)
    _randomise_adapters(model, seed=2)
    train = PHI_PAIRS if trainable == "phi" else THETA_PAIRS
    frozen = THETA_PAIRS if trainable == "phi" else PHI_PAIRS
    for _, m in gaussian_lora_modules(model):
        for p in m.pair_params(frozen):
            p.requires_grad_(False)
    params = [p for _, m in gaussian_lora_modules(model) for p in m.pair_params(train)]
    kl, prior = model_kl_and_neg_log_prior(model, 1.0, 0.01, chunk_rows=5)
    grads = torch.autograd.grad(kl + 1e-3 * prior, params)
    kl_ref, prior_ref = _dense_reference(model, 1.0, 0.01)
    grads_ref = torch.autograd.grad(kl_ref + 1e-3 * prior_ref, params)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    for _, m in gaussian_lora_modules(model):
        assert all(p.grad is None for p in m.pair_params(frozen))


def test_kl_and_prior_without_autograd_and_in_bf16():
    torch.manual_seed(0)
    model = gaussian_lora_tiny_llama(c=-20.0)
    _randomise_adapters(model, seed=3)
    kl_ref, prior_ref = _dense_reference(model, 1.0, 0.01)
    with torch.no_grad():
        kl, prior = model_kl_and_neg_log_prior(model, 1.0, 0.01)
    assert not kl.requires_grad
    torch.testing.assert_close(kl, kl_ref.detach(), rtol=1e-5, atol=1e-3)
    model = model.to(torch.bfloat16)
    params = [p for _, m in gaussian_lora_modules(model) for p in m.pair_params(PAIRS)]
    kl16, prior16 = model_kl_and_neg_log_prior(model, 1.0, 0.01)
    assert kl16.dtype == torch.float32  # computed in float32 from the bf16 factors
    grads = torch.autograd.grad(kl16 + 1e-3 * prior16, params)
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all() for g in grads)


def test_model_kl_is_zero_when_phi_equals_theta():
    model = gaussian_lora_tiny_llama()
    _randomise_adapters(model)
    for _, m in gaussian_lora_modules(model):
        m.copy_theta_to_phi()
    assert abs(model_kl(model).item()) < 1e-2  # float32 sums of ~1e4 terms of exactly 0


def test_answer_nll_uses_only_answer_tokens_and_shifts_by_one():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.full((2, 5), -100)
    labels[0, 3] = 4
    labels[1, 4] = 9
    # position t predicts token t+1
    ref = -(
        torch.log_softmax(logits[0, 2], -1)[4] + torch.log_softmax(logits[1, 3], -1)[9]
    ) / 2
    torch.testing.assert_close(answer_nll(logits, labels), ref)


@pytest.mark.parametrize("builder", ["tiny_llama", "smollm2_shape"])
def test_model_answer_nll_equals_full_logits_nll(builder):
    from abmll.models import tiny_llama
    from abmll.objectives import model_answer_nll

    torch.manual_seed(0)
    if builder == "tiny_llama":
        model = tiny_llama()
    else:  # tied embeddings (TiedLinear output), as SmolLM2 and Llama3.2
        from torchtune.models.llama3_2._component_builders import llama3_2

        model = llama3_2(vocab_size=300, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                         max_seq_len=64, intermediate_dim=64, scale_factor=1)
    tokens = torch.randint(0, 256, (3, 10))
    labels = torch.full((3, 10), -100)
    labels[0, 9], labels[1, 4], labels[2, 6], labels[2, 7] = 5, 7, 9, 11
    full = answer_nll(model(tokens), labels)
    torch.testing.assert_close(model_answer_nll(model, tokens, labels), full)
    # the model is left as it was
    assert "unembed" not in vars(model)
    assert model(tokens).shape[-1] in (264, 300)


def _final_hidden_models():
    from abmll.models import tiny_llama

    torch.manual_seed(0)
    plain = tiny_llama()
    gauss = gaussian_lora_tiny_llama()
    _randomise_adapters(gauss)  # mu_phi != 0, so the adapters take part in the comparison
    return {"tiny_llama": plain, "gaussian_lora_tiny_llama": gauss}


@pytest.mark.parametrize("name", ["tiny_llama", "gaussian_lora_tiny_llama"])
@pytest.mark.parametrize("mode", ["mean", "sample"])
def test_final_hidden_states_then_output_is_torchtunes_forward(name, mode):
    # final_hidden_states shadows TransformerDecoder.unembed: if torchtune's forward stopped
    # going through unembed (or unembed did more than norm + output), this comparison breaks.
    from abmll.modules import gaussian_mode
    from abmll.objectives import final_hidden_states

    model = _final_hidden_models()[name].eval()
    tokens = torch.randint(0, 256, (3, 10))
    with torch.no_grad(), gaussian_mode(model, mode):
        # "sample" draws one weight sample per forward from the global RNG: same seed, same W.
        torch.manual_seed(1)
        hidden = final_hidden_states(model, tokens)
        torch.manual_seed(1)
        reference = model(tokens)
        assert "unembed" not in vars(model)  # restored: the next forward is torchtune's own
        assert hidden.shape == (3, 10, model.tok_embeddings.embedding_dim)
        torch.testing.assert_close(model.output(hidden).float(), reference)
        # torchtune's chunked output (num_output_chunks) is bypassed as well.
        model.set_num_output_chunks(4)
        torch.manual_seed(1)
        chunked = torch.cat(model(tokens), dim=1)
        torch.manual_seed(1)
        torch.testing.assert_close(final_hidden_states(model, tokens), hidden)
    torch.testing.assert_close(model.output(hidden).float(), chunked)


def test_final_hidden_states_restores_unembed_when_the_forward_raises():
    from abmll.objectives import final_hidden_states

    model = _final_hidden_models()["tiny_llama"]
    bad = torch.full((1, 4), 10_000)  # outside the vocabulary: the embedding raises
    with pytest.raises(IndexError):
        final_hidden_states(model, bad)
    assert "unembed" not in vars(model)
    tokens = torch.randint(0, 256, (1, 4))
    assert model(tokens).shape == (1, 4, 264)  # logits again, not hidden states
