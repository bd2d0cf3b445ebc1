"""GaussianLoRALinear: the adapter protocol, the three forward modes, and memory."""

import pytest
import torch
from torch import nn
from torchtune.modules.peft import get_adapter_params, get_adapter_state_dict

from abmll.models import add_gaussian_lora, gaussian_lora_tiny_llama, gaussian_lora_llama3_8b, tiny_llama
from abmll.modules import PAIRS, GaussianLoRALinear, gaussian_lora_modules, set_gaussian_mode


def _layer(c=-2.0, seed=0):
    torch.manual_seed(seed)
    layer = GaussianLoRALinear(in_dim=6, out_dim=5, rank=2, alpha=4, c=c)
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
    layer = _layer(c=-1.0)
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


def test_no_dense_d_out_by_d_in_tensor_is_saved_for_backward_except_w0():
    layer = GaussianLoRALinear(in_dim=64, out_dim=48, rank=4, alpha=8, c=-5.0)
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


def test_gradients_reach_only_phi_through_the_forward():
    layer = _layer()
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


def test_llama3_8b_builds_on_meta_with_expected_parameter_count():
    with torch.device("meta"):
        model = gaussian_lora_llama3_8b()
    total = sum(p.numel() for p in model.parameters())
    adapters = sum(p.numel() for p in get_adapter_params(model).values())
    r, d, kv = 8, 4096, 1024
    per_block = 4 * ((d * r + r * d) + (d * r + r * kv) + (d * r + r * d))  # q, v, output
    assert adapters == 32 * per_block
    assert total - adapters == 8_030_261_248  # Llama3-8B
