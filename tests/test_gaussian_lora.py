"""GaussianLoRALinear: the adapter protocol, the forward modes and samplings, and memory."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchtune.modules.peft import LoRALinear, get_adapter_params, get_adapter_state_dict

from abmll.models import (
    add_gaussian_lora,
    gaussian_lora_llama3_8b,
    gaussian_lora_tiny_llama,
    gaussian_lora_tiny_qwen2,
    tiny_llama,
    tiny_qwen2,
)
from abmll.modules import DEFAULT_SAMPLING, PAIRS, GaussianLoRALinear, gaussian_lora_modules, gaussian_mode, set_gaussian_mode
from abmll.modules.gaussian_lora import (
    SAMPLINGS,
    _SampledWeightLinear,
    _draw_seed,
    _output_noise,
    _output_std,
    _weight_noise,
    set_gaussian_sampling,
)


def _layer(c=-2.0, seed=0, sampling=DEFAULT_SAMPLING):
    torch.manual_seed(seed)
    layer = GaussianLoRALinear(in_dim=6, out_dim=5, rank=2, alpha=4, c=c, sampling=sampling)
    with torch.no_grad():
        for p in layer.pair_params(PAIRS):
            p.normal_(0, 0.3)
    return layer


def test_adapter_params_are_the_eight_lora_matrices_and_torchtune_finds_them():
    model = gaussian_lora_tiny_llama()
    params = get_adapter_params(model)
    n_layers = len(list(gaussian_lora_modules(model)))
    assert n_layers == 2 * 3  # 2 blocks x (q, v, output)
    assert len(params) == n_layers * 8
    assert all("lora_" in k for k in params)
    assert set(get_adapter_state_dict(model.state_dict())) == set(params)


def test_base_keys_unchanged_so_base_checkpoints_load():
    plain = tiny_llama()
    gauss = add_gaussian_lora(tiny_llama())
    adapter = set(get_adapter_params(gauss))
    assert set(gauss.state_dict()) - adapter == set(plain.state_dict())


def test_phi_starts_as_a_copy_of_theta_and_model_matches_base_in_mean_mode():
    torch.manual_seed(0)
    base = tiny_llama()
    torch.manual_seed(0)
    model = add_gaussian_lora(tiny_llama())
    for _, m in gaussian_lora_modules(model):
        for src, dst in (("mu_theta", "mu_phi"), ("lv_theta", "lv_phi")):
            for s, d in zip(m.factors(src), m.factors(dst)):
                assert torch.equal(s, d)
    set_gaussian_mode(model, "mean")
    tokens = torch.randint(0, 256, (2, 12))
    torch.testing.assert_close(model(tokens), base(tokens))


def test_mean_mode_is_deterministic_and_equals_w0_plus_mu_phi():
    layer = _layer()
    layer.mode = "mean"
    x = torch.randn(3, 6)
    w = layer.weight + layer.dense("mu_phi")
    torch.testing.assert_close(layer(x), x @ w.T)


def test_local_reparameterisation_matches_weight_sampling_moments():
    """Training-mode outputs have mean x(W0+mu)^T and variance x^2 exp(lv)^T."""
    layer = _layer(c=-1.0, sampling="local")
    x = torch.randn(1, 6).expand(20000, 6)
    with torch.enable_grad():
        out = layer(x).detach()
    mean = x[0] @ (layer.weight + layer.dense("mu_phi")).T
    var = x[0].square() @ torch.exp(layer.dense("lv_phi")).T
    torch.testing.assert_close(out.mean(0), mean.detach(), atol=4 * (var.sqrt() / 141).max().item(), rtol=0)
    torch.testing.assert_close(out.var(0), var.detach(), rtol=0.05, atol=0)


def test_eval_sampling_draws_one_weight_shared_by_the_batch():
    layer = _layer(c=-1.0)
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.manual_seed(3)
        out = layer(x)
        torch.manual_seed(3)
        w0_mu = layer.weight + layer.dense("mu_phi")
        std = torch.exp(0.5 * layer.dense("lv_phi"))
        w = w0_mu + std * torch.randn_like(std)
    torch.testing.assert_close(out, x @ w.T)
    # moments over many draws
    with torch.no_grad():
        outs = torch.stack([layer(x[:1]) for _ in range(5000)]).squeeze(1)
    var = x[0].square() @ torch.exp(layer.dense("lv_phi")).T
    torch.testing.assert_close(outs.var(0), var.detach(), rtol=0.08, atol=0)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_no_dense_d_out_by_d_in_tensor_is_saved_for_backward_except_w0(sampling):
    layer = GaussianLoRALinear(in_dim=64, out_dim=48, rank=4, alpha=8, c=-5.0, sampling=sampling)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(3, 7, 64)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    big = [t for t in saved if t.numel() >= 48 * 64]
    assert all(t.data_ptr() == layer.weight.data_ptr() for t in big), [tuple(t.shape) for t in big]
    out.sum().backward()
    assert layer.lora_lv_phi_b.weight.grad is not None


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_gradients_reach_only_phi_through_the_forward(sampling):
    layer = _layer(sampling=sampling)
    layer(torch.randn(2, 6)).sum().backward()
    for name in ("mu_phi", "lv_phi"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.pair_params((name,)))
    for name in ("mu_theta", "lv_theta"):
        assert all(p.grad is None for p in layer.pair_params((name,)))
    assert layer.weight.grad is None


def test_bias_is_kept_for_qwen_style_projections():
    base = nn.Linear(6, 5, bias=True)
    layer = GaussianLoRALinear(6, 5, rank=2, alpha=4, use_bias=True)
    layer.weight.data.copy_(base.weight.data)
    layer.bias.data.copy_(base.bias.data)
    layer.mode = "mean"
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), base(x))


def test_tiny_qwen2_gaussian_model_keeps_the_frozen_q_v_bias_and_uses_it():
    """Qwen2's q/k/v carry a bias: add_gaussian_lora keeps it (frozen, not an adapter), the
    forward adds it, and the base state dict is tiny_qwen2's key for key."""
    torch.manual_seed(0)
    model = gaussian_lora_tiny_qwen2().eval()
    base_keys = set(tiny_qwen2().state_dict())
    adapters = set(get_adapter_params(model))
    assert set(model.state_dict()) - adapters == base_keys
    attn = model.layers[0].attn
    assert isinstance(attn.q_proj, GaussianLoRALinear) and isinstance(attn.v_proj, GaussianLoRALinear)
    assert attn.output_proj.bias is None and not isinstance(attn.k_proj, GaussianLoRALinear)
    for proj in (attn.q_proj, attn.v_proj):
        assert proj.use_bias and proj.bias is not None and proj.bias.requires_grad is False
        assert "bias" not in " ".join(proj.adapter_params())
    layer = attn.q_proj
    x = torch.randn(2, 3, layer.in_dim)
    for mode in ("mean", "sample"):
        layer.mode = mode
        with torch.no_grad():
            torch.manual_seed(1)
            before = layer(x)
            layer.bias.add_(1.0)
            torch.manual_seed(1)
            after = layer(x)
            layer.bias.sub_(1.0)
        torch.testing.assert_close(after - before, torch.ones_like(before))  # the bias enters once
    layer.mode = "sample"
    torch.manual_seed(1)
    layer(x).sum().backward()  # training path (local reparameterisation): bias used, no gradient
    assert layer.bias.grad is None
    set_gaussian_mode(model, "mean")  # deterministic: only the bias changes the output below
    with torch.no_grad():
        tokens = torch.randint(0, 256, (1, 7))
        out = model(tokens)
        attn.q_proj.bias.normal_()
        assert (model(tokens) - out).abs().max() > 1e-3  # the model's output depends on it


def test_llama3_8b_builds_on_meta_with_expected_parameter_count():
    with torch.device("meta"):
        model = gaussian_lora_llama3_8b()
    total = sum(p.numel() for p in model.parameters())
    adapters = sum(p.numel() for p in get_adapter_params(model).values())
    r, d, kv = 8, 4096, 1024
    per_block = 4 * ((d * r + r * d) + (d * r + r * kv) + (d * r + r * d))  # q, v, output
    assert adapters == 32 * per_block
    assert total - adapters == 8_030_261_248  # Llama3-8B


# --- the variance in the compute dtype, the noise under checkpoint, the weight-sample path -------



def _float32_std_reference(x, a, b, scale, c):
    """The former implementation: the dense exp(scale*b@a + c) and the matmul in float32."""
    var_w = torch.exp(scale * (b.float() @ a.float()) + c)
    return F.linear(x.float().square(), var_w).clamp_min(1e-30).sqrt()


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_output_std_in_compute_dtype_equals_float32_reference_values_and_gradients(dtype, tol):
    """exp(c) and a row maximum are factored out, so bf16 holds the matmul; the log-variances
    span ~10 units around c = -20 (rows whose variances differ by e^10)."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 40).to(dtype).requires_grad_()
    a = (torch.randn(4, 40) * 0.8).to(dtype).requires_grad_()
    b = (torch.randn(24, 4) * 0.8).to(dtype).requires_grad_()
    scale, c = 2.0, -20.0
    w = torch.randn(3, 5, 24)  # a random cotangent

    std = _output_std(x, a, b, scale, c)
    assert std.dtype == dtype
    grads = torch.autograd.grad((std.float() * w).sum(), (x, a, b))

    xr, ar, br = (t.detach().float().requires_grad_() for t in (x, a, b))
    ref = _float32_std_reference(xr, ar, br, scale, c)
    grads_ref = torch.autograd.grad((ref * w).sum(), (xr, ar, br))

    assert ref.min() > 0 and (ref.max() / ref.min()).item() > 1e2  # a wide range of scales
    if dtype == torch.float32:
        torch.testing.assert_close(std, ref, rtol=tol, atol=0)
        for g, r in zip(grads, grads_ref):
            torch.testing.assert_close(g, r, rtol=tol, atol=tol * r.abs().max().item())
    else:
        torch.testing.assert_close(std.float(), ref, rtol=tol, atol=0)
        for g, r in zip(grads, grads_ref):
            assert _rel_err(g, r) < tol, _rel_err(g, r)


def test_output_std_does_not_overflow_for_large_log_variance_offsets():
    """A row maximum far above 88 (exp overflow in float32) is factored out exactly."""
    x = torch.ones(1, 3, dtype=torch.bfloat16)
    a = torch.tensor([[1.0, 1.0, 1.0]])
    b = torch.tensor([[100.0], [-100.0]])
    std = _output_std(x, a, b, 1.0, -20.0)
    ref = torch.exp(0.5 * (torch.tensor([100.0, -100.0]) - 20.0)) * 3 ** 0.5
    assert torch.isfinite(std).all()
    torch.testing.assert_close(std.float()[0], ref, rtol=1e-2, atol=0)


def test_local_noise_is_recomputed_identically_under_checkpoint():
    """The checkpointed noise (std and eps recomputed in the backward) gives the gradients of an
    un-checkpointed forward with the same seed; a different eps in the backward would not."""
    layer = _layer(c=-1.0, sampling="local")
    x = torch.randn(4, 3, 6, requires_grad=True)
    w = torch.randn(4, 3, 5)
    params = [x] + list(layer.pair_params(("mu_phi", "lv_phi")))

    torch.manual_seed(7)
    out = layer(x)
    grads = torch.autograd.grad((out * w).sum(), params)

    torch.manual_seed(7)
    b, a = layer.factors("lv_phi")
    ref = layer._mean_output(x) + _output_noise(x, a, b, layer.scale, layer.c)  # no checkpoint
    grads_ref = torch.autograd.grad((ref * w).sum(), params)

    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)

    torch.manual_seed(8)  # a different eps changes the variance pair's gradients
    other = layer._mean_output(x) + _output_noise(x, a, b, layer.scale, layer.c)
    grads_other = torch.autograd.grad((other * w).sum(), params)
    assert not torch.allclose(grads_other[-1], grads_ref[-1])


def _saved_bytes(fn, module):
    """Bytes of unique non-parameter storages saved for backward while running ``fn``."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(saved.values())


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_training_forward_saves_no_more_than_torchtune_lora(sampling):
    torch.manual_seed(0)
    gauss = GaussianLoRALinear(in_dim=64, out_dim=48, rank=4, alpha=8, c=-5.0, sampling=sampling)
    lora = LoRALinear(in_dim=64, out_dim=48, rank=4, alpha=8)
    x = torch.randn(3, 7, 64, requires_grad=True)
    out, g_bytes = _saved_bytes(lambda: gauss(x), gauss)
    _, l_bytes = _saved_bytes(lambda: lora(x), lora)
    assert l_bytes == x.numel() * 4 + 3 * 7 * 4 * 4  # x and x A^T
    assert g_bytes == l_bytes, (g_bytes, l_bytes)
    out.sum().backward()
    assert gauss.lora_lv_phi_b.weight.grad is not None and gauss.lora_lv_phi_b.weight.grad.abs().sum() > 0


def _explicit_weight_sample(layer, x, seed):
    """Autograd through W = W0 + mu_phi + exp(lv_phi / 2) * eps with the eps of ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(layer.out_dim, layer.in_dim, generator=gen)
    w = layer.weight + layer.dense("mu_phi") + torch.exp(0.5 * layer.dense("lv_phi")) * eps
    return F.linear(x, w, layer.bias)


@pytest.mark.parametrize("use_bias", [False, True])
def test_weight_sampling_gradients_equal_autograd_through_the_same_weight_sample(use_bias):
    """The custom backward regenerates the forward's eps from the seed: its gradients equal
    autograd's through an explicit sample with that eps (x, and both phi pairs)."""
    layer = _layer(c=-1.0)
    if use_bias:
        layer = GaussianLoRALinear(6, 5, rank=2, alpha=4, c=-1.0, use_bias=True)
        with torch.no_grad():
            for p in layer.pair_params(PAIRS):
                p.normal_(0, 0.3)
    layer.sampling = "weight"
    x = torch.randn(4, 3, 6, requires_grad=True)
    w = torch.randn(4, 3, 5)
    params = [x] + list(layer.pair_params(("mu_phi", "lv_phi")))

    torch.manual_seed(11)
    out = layer(x)
    grads = torch.autograd.grad((out * w).sum(), params)

    torch.manual_seed(11)
    ref = _explicit_weight_sample(layer, x, _draw_seed())
    grads_ref = torch.autograd.grad((ref * w).sum(), params)

    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("fold", [True, False])
def test_sampled_weight_function_both_forms_match_explicit_autograd(fold):
    """fold=True (float32: W0 + noise in one matmul) and fold=False (bf16: the noise's own
    matmul) compute the same function and gradients."""
    torch.manual_seed(0)
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    w0 = torch.randn(6, 8, dtype=torch.float64)
    a = (torch.randn(3, 8) * 0.5).requires_grad_()
    b = (torch.randn(6, 3) * 0.5).requires_grad_()
    g = torch.randn(5, 6, dtype=torch.float64)
    out = _SampledWeightLinear.apply(x, w0, a, b, 2.0, -3.0, 1234, fold)
    grads = torch.autograd.grad((out * g).sum(), (x, a, b))

    eps = torch.randn(6, 8, generator=torch.Generator().manual_seed(1234))
    noise = torch.exp(0.5 * (2.0 * (b @ a) - 3.0)) * eps
    ref = x @ (w0 + noise.double()).T
    grads_ref = torch.autograd.grad((ref * g).sum(), (x, a, b))
    torch.testing.assert_close(out, ref)
    for gr, r in zip(grads, grads_ref):
        torch.testing.assert_close(gr.double(), r.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_weight_noise(a, b, 2.0, -3.0, 1234), noise.detach())


def test_weight_sampling_bf16_keeps_the_noise_below_w0_resolution():
    """In bf16 a weight noise below half an ulp of W0 vanishes in W0 + noise: the noise gets its
    own matmul. W0 = +-1.5 alternating and x = 1 make x W0^T exactly 0, so the output is x noise^T
    alone (std 5e-4 per weight; half an ulp of 1.5 in bf16 is 3.9e-3)."""
    torch.manual_seed(0)
    c = 2 * math.log(5e-4)
    layer = GaussianLoRALinear(64, 16, rank=2, alpha=4, c=c, sampling="weight").to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, -1.5]).repeat(16, 32))
    x = torch.ones(2, 64, dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    b, a = layer.factors("lv_phi")
    seed = _draw_seed()
    noise = _weight_noise(a, b, layer.scale, layer.c, seed)
    torch.testing.assert_close(out.float(), (x.detach().float() @ noise.T), rtol=2e-2, atol=1e-4)
    assert out.float().abs().min() > 0
    folded = _SampledWeightLinear.apply(x, layer.weight, a, b, layer.scale, layer.c, seed, True)
    assert folded.abs().max() == 0  # what folding into bf16 W0 would have done
    out.sum().backward()
    assert torch.isfinite(layer.lora_lv_phi_a.weight.grad).all()


def test_weight_sampling_moments_per_forward_call():
    layer = _layer(c=-1.0)
    layer.sampling = "weight"
    x = torch.randn(1, 6)
    with torch.enable_grad():
        outs = torch.stack([layer(x).detach() for _ in range(4000)]).squeeze(1)
    mean = x[0] @ (layer.weight + layer.dense("mu_phi")).T
    var = x[0].square() @ torch.exp(layer.dense("lv_phi")).T
    torch.testing.assert_close(outs.mean(0), mean.detach(), atol=5 * (var.sqrt() / 63).max().item(), rtol=0)
    torch.testing.assert_close(outs.var(0), var.detach(), rtol=0.1, atol=0)
    # one sample per call, shared by the batch: two identical rows get identical outputs
    with torch.enable_grad():
        out = layer(torch.cat([x, x]))
    torch.testing.assert_close(out[0], out[1])


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_both_samplings_are_reproduced_under_an_enclosing_checkpoint(sampling):
    """torchtune's activation checkpointing recomputes whole blocks: the recomputed noise must be
    the forward's (checkpoint restores the RNG state; the weight path's seed comes from it)."""
    layer = _layer(c=-1.0)
    layer.sampling = sampling
    x = torch.randn(2, 3, 6, requires_grad=True)
    w = torch.randn(2, 3, 5)
    params = [x] + list(layer.pair_params(("mu_phi", "lv_phi")))
    torch.manual_seed(5)
    out = checkpoint(layer, x, use_reentrant=False)
    grads = torch.autograd.grad((out * w).sum(), params)
    torch.manual_seed(5)
    ref = layer(x)
    grads_ref = torch.autograd.grad((ref * w).sum(), params)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)


def test_sampling_is_validated_and_set_model_wide():
    with pytest.raises(ValueError, match="sampling"):
        GaussianLoRALinear(6, 5, rank=2, alpha=4, sampling="exact")
    model = gaussian_lora_tiny_llama()
    set_gaussian_sampling(model, "weight")
    assert all(m.sampling == "weight" for _, m in gaussian_lora_modules(model))
    with pytest.raises(ValueError, match="sampling"):
        set_gaussian_sampling(model, "exact")
    layer = _layer()
    layer.sampling = "exact"
    with pytest.raises(ValueError, match="sampling"):
        layer(torch.randn(2, 6))


def test_eval_sample_under_bf16_autocast_builds_log_variance_in_float32():
    """Under the learners' bf16 autocast, evaluation's weight noise has the float32 std: a
    bf16 log-variance near c = -20 would be rounded to steps of 0.125 (std off by up to 6%)."""
    from abmll.modules import GaussianLoRALinear

    torch.manual_seed(0)
    layer = GaussianLoRALinear(64, 32, rank=4, alpha=8, c=-20.0)
    with torch.no_grad():
        layer.lora_lv_phi_b.weight.normal_(0.0, 0.01)  # log-variances spread off the bf16 grid
        state = torch.get_rng_state()
        ref = layer.sample_weight_noise()
        torch.set_rng_state(state)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer.sample_weight_noise()
            torch.set_rng_state(state)
            b, a = layer.factors("lv_phi")
            lv16 = b @ (a * layer.scale) + layer.c  # what autocast alone would give
            rounded = torch.exp(0.5 * lv16.float()) * torch.randn(32, 64)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    assert not torch.allclose(rounded, ref, rtol=1e-3, atol=0)  # the bug this guards against


def test_gaussian_mode_sets_every_layer_and_restores_each_previous_mode_also_on_error():
    model = gaussian_lora_tiny_llama()
    layers = [m for _, m in gaussian_lora_modules(model)]
    # Mixed modes on entry: the context must put back each layer's own mode, not "sample".
    before = ["mean" if i % 2 else "sample" for i in range(len(layers))]
    for layer, mode in zip(layers, before):
        layer.mode = mode
    with gaussian_mode(model, "mean"):
        assert {m.mode for m in layers} == {"mean"}
        with gaussian_mode(model, "sample"):
            assert {m.mode for m in layers} == {"sample"}
        assert {m.mode for m in layers} == {"mean"}
    assert [m.mode for m in layers] == before
    with pytest.raises(RuntimeError, match="boom"):
        with gaussian_mode(model, "sample"):
            assert {m.mode for m in layers} == {"sample"}
            raise RuntimeError("boom")
    assert [m.mode for m in layers] == before


def test_gaussian_mode_rejects_a_bad_mode_naming_the_allowed_ones_and_changes_nothing():
    model = gaussian_lora_tiny_llama()
    with pytest.raises(ValueError, match=r"'sample', 'mean'.*'Mean'"):
        with gaussian_mode(model, "Mean"):
            pass
    assert {m.mode for _, m in gaussian_lora_modules(model)} == {"sample"}
