"""Which parameters each learner moves, and the updates against hand computations."""

import copy

import pytest
import torch
from torchtune.modules.peft import get_adapter_params

from abmll.data import TaskSampler, load_split
from abmll.learners import ABMLL, Pretrained, RegularLoRA, Reptile, StructuredLoRA
from abmll.models import gaussian_lora_tiny_llama, lora_tiny_llama, tiny_tokenizer
from abmll.modules import PHI_PAIRS, THETA_PAIRS, gaussian_lora_modules
from abmll.objectives import answer_nll


@pytest.fixture(scope="module")
def sampler():
    split = load_split("tiny")
    return TaskSampler(split.train, tiny_tokenizer(), batch_size=2, max_seq_len=256, seed=0)


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _changed(before, params):
    return [not torch.equal(b, p) for b, p in zip(before, params)]


def _frozen(model):
    adapter = set(get_adapter_params(model))
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in adapter}


def _abmll_setup(seed=0, **kw):
    torch.manual_seed(seed)
    model = gaussian_lora_tiny_llama()
    learner = ABMLL(inner_lr=1e-2, outer_lr=1e-2, beta=1e-3, **kw)
    learner.setup(model, torch.device("cpu"))
    return model, learner


def test_abmll_inner_loop_moves_only_phi_and_outer_only_theta(sampler, monkeypatch):
    model, learner = _abmll_setup()
    episode = next(iter(learner.episodes(sampler, epoch=1, seed=0)))
    theta0, phi0 = _snapshot(learner.theta), _snapshot(learner.phi)

    # Look right after the inner loop (the outer gradient's start) and at the outer step.
    seen = {}
    real_outer_gradient = learner._outer_gradient

    def outer_gradient(query):
        seen["theta_before_outer"] = _snapshot(learner.theta)
        seen["phi_after_inner"] = _snapshot(learner.phi)
        return real_outer_gradient(query)

    def outer_step(*a, **k):
        seen["theta_grads"] = [p.grad is not None for p in learner.theta]
        seen["phi_grads"] = [p.grad is not None for p in learner.phi]
        return real_step(*a, **k)

    real_step = learner.outer_optimizer.step
    monkeypatch.setattr(learner.outer_optimizer, "step", outer_step)
    monkeypatch.setattr(learner, "_outer_gradient", outer_gradient)
    learner.train_episode(episode)

    # inner loop: theta untouched, phi moved
    assert not any(_changed(theta0, seen["theta_before_outer"]))
    assert any(_changed(phi0, seen["phi_after_inner"]))
    # outer step: gradients only on theta
    assert all(seen["theta_grads"]) and not any(seen["phi_grads"])
    # outer step moved theta; afterwards phi == theta, all four matrices of every layer
    assert any(_changed(seen["theta_before_outer"], learner.theta))
    for _, layer in gaussian_lora_modules(model):
        for src, dst in (("mu_theta", "mu_phi"), ("lv_theta", "lv_phi")):
            for s, d in zip(layer.factors(src), layer.factors(dst)):
                assert torch.equal(s, d)


def test_abmll_theta_gets_no_gradient_from_the_nll(sampler):
    """With beta = 0 only the NLL is left, and it does not reach theta."""
    model, learner = _abmll_setup(seed=1)
    learner.beta = 0.0
    episode = next(iter(learner.episodes(sampler, epoch=1, seed=0)))
    theta0 = _snapshot(learner.theta)
    learner.train_episode(episode)
    assert not any(_changed(theta0, learner.theta))


@pytest.mark.parametrize(
    "make",
    [
        lambda: (gaussian_lora_tiny_llama(), ABMLL(inner_lr=1e-2, outer_lr=1e-2)),
        lambda: (lora_tiny_llama(), Reptile(lr=1e-2)),
        lambda: (lora_tiny_llama(), StructuredLoRA(lr=1e-2)),
        lambda: (lora_tiny_llama(), RegularLoRA(lr=1e-2)),
    ],
    ids=["abmll", "reptile", "structured", "regular"],
)
def test_frozen_weights_never_change(sampler, make):
    torch.manual_seed(0)
    model, learner = make()
    learner.setup(model, torch.device("cpu"))
    before = _frozen(model)
    adapters0 = _snapshot(learner.adapter_params.values())
    episodes = list(learner.episodes(sampler, epoch=1, seed=0))[:2]
    for ep in episodes:
        learner.train_episode(ep)
    support, _ = sampler.adaptation_split(sampler.task_names[0], 2, 4)
    with learner.adapted(support):
        pass
    after = _frozen(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(_changed(adapters0, learner.adapter_params.values()))


def _hand_adamw_steps(model, batches, lr):
    """K plain AdamW steps on a copy's LoRA adapters: the inner loop written out."""
    params = list(get_adapter_params(model).values())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for b in batches:
        loss = answer_nll(model(b["tokens"]), b["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in get_adapter_params(model).items()}


@pytest.mark.parametrize("epsilon", [0.5, 0.3, 1.0])
def test_reptile_update_matches_hand_computation(sampler, epsilon):
    torch.manual_seed(0)
    model = lora_tiny_llama()
    learner = Reptile(lr=1e-2, epsilon=epsilon)
    learner.setup(model, torch.device("cpu"))
    # make B non-zero so that every adapter matrix moves
    with torch.no_grad():
        for p in learner.adapter_params.values():
            p.add_(0.01 * torch.randn_like(p))
    episode = next(iter(learner.episodes(sampler, epoch=1, seed=0)))
    theta = {k: v.detach().clone() for k, v in learner.adapter_params.items()}
    phi = _hand_adamw_steps(copy.deepcopy(model), episode.support, 1e-2)

    learner.train_episode(episode)
    for k, p in learner.adapter_params.items():
        expected = theta[k] + epsilon * (phi[k] - theta[k])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)


def test_test_time_adaptation_restores_adapters(sampler):
    model, learner = _abmll_setup()
    before = _snapshot(learner.adapter_params.values())
    theta0, phi0 = _snapshot(learner.theta), _snapshot(learner.phi)
    support, _ = sampler.adaptation_split(sampler.task_names[0], 3, 4)
    with learner.adapted(support):
        # only phi adapts at test time
        assert any(_changed(phi0, learner.phi))
        assert not any(_changed(theta0, learner.theta))
    assert not any(_changed(before, learner.adapter_params.values()))


def test_pretrained_has_no_episodes_and_does_not_adapt(sampler):
    model = lora_tiny_llama()
    learner = Pretrained()
    learner.setup(model, torch.device("cpu"))
    assert list(learner.episodes(sampler, 1, 0)) == []
    before = _snapshot(learner.adapter_params.values())
    support, _ = sampler.adaptation_split(sampler.task_names[0], 2, 4)
    with learner.adapted(support):
        assert not any(_changed(before, learner.adapter_params.values()))


def test_learner_rejects_a_model_of_the_wrong_kind():
    with pytest.raises(ValueError, match="GaussianLoRALinear"):
        ABMLL().setup(lora_tiny_llama(), torch.device("cpu"))
    with pytest.raises(ValueError, match="LoRALinear"):
        Reptile().setup(gaussian_lora_tiny_llama(), torch.device("cpu"))


@pytest.mark.parametrize(
    "make,key",
    [
        (lambda: ABMLL(beta=-1.0), "learner.beta"),
        (lambda: ABMLL(inner_steps=0), "learner.inner_steps"),
        (lambda: ABMLL(b0=0.0), "learner.b0"),
        (lambda: Reptile(epsilon=1.5), "learner.epsilon"),
        (lambda: RegularLoRA(lr=-1e-5), "learner.lr"),
    ],
)
def test_nonsense_hyperparameters_name_their_key(make, key):
    with pytest.raises(ValueError, match=key):
        make()


# --- the outer step's two readings (learner.outer_gradient) --------------------------------


def test_outer_gradient_is_validated_and_defaults_to_the_module_constant():
    from abmll.learners.abmll import DEFAULT_OUTER_GRADIENT, OUTER_GRADIENTS

    assert ABMLL().outer_gradient == DEFAULT_OUTER_GRADIENT in OUTER_GRADIENTS
    for reading in OUTER_GRADIENTS:
        assert ABMLL(outer_gradient=reading).outer_gradient == reading
    with pytest.raises(ValueError) as err:
        ABMLL(outer_gradient="second_order")
    assert str(err.value) == (
        "learner.outer_gradient must be one of ('kl_only', 'first_order'), got 'second_order'"
    )


def test_abmll_first_order_theta_gets_the_nll_gradient(sampler):
    """The counterpart of the kl_only test above: with beta = 0 only the NLL is left, and
    under first_order it reaches theta, through the phi gradient it adds to theta's."""
    model, learner = _abmll_setup(seed=1, outer_gradient="first_order")
    learner.beta = 0.0
    episode = next(iter(learner.episodes(sampler, epoch=1, seed=0)))
    theta0 = _snapshot(learner.theta)
    logs = learner.train_episode(episode)
    assert any(_changed(theta0, learner.theta))
    assert logs["outer_nll_grad_norm"] > 0
    assert all(p.grad is None for p in learner.theta + learner.phi)
    for _, layer in gaussian_lora_modules(model):  # and phi <- theta still follows
        for src, dst in (("mu_theta", "mu_phi"), ("lv_theta", "lv_phi")):
            for s, d in zip(layer.factors(src), layer.factors(dst)):
                assert torch.equal(s, d)


@pytest.mark.parametrize("make_model,make_learner", [
    (gaussian_lora_tiny_llama, lambda: ABMLL(inner_lr=1e-4, outer_lr=1e-4)),
    (lora_tiny_llama, lambda: RegularLoRA(lr=1e-4)),
])
def test_bf16_compute_keeps_float32_adapters_whose_small_updates_land(sampler, make_model, make_learner):
    """dtype=bf16: frozen weights in bf16, adapters float32 master weights, forward under autocast.

    An AdamW step moves each A entry by ~lr = 1e-4, below half a bf16 ulp of a ~0.1 entry: in
    bf16 those updates would round away; in float32 they land."""
    torch.manual_seed(0)
    with torch.device("cpu"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = make_model()
        finally:
            torch.set_default_dtype(torch.float32)
    with torch.no_grad():  # B starts at zero, which gives A no gradient: start from B != 0
        for name, p in model.named_parameters():
            if name.endswith("_b.weight") or name.endswith("lora_b.weight"):
                p.normal_(0.0, 0.02)
    learner = make_learner()
    learner.setup(model, torch.device("cpu"), compute_dtype=torch.bfloat16)
    adapters = learner.adapter_params
    assert all(p.dtype == torch.float32 for p in adapters.values())
    adapter_ids = {id(p) for p in adapters.values()}
    frozen = {n: p for n, p in model.named_parameters() if id(p) not in adapter_ids}
    # RMSNorm scales are kept float32 (torchtune's norm computes in float32; the fused kernel
    # needs a float32 weight); every other frozen weight stays bf16.
    norms = {n for n in frozen if n.endswith("norm.scale")}
    assert norms and all(frozen[n].dtype == torch.float32 for n in norms)
    assert all(p.dtype == torch.bfloat16 for n, p in frozen.items() if n not in norms)
    a_keys = [k for k in adapters if k.endswith("lora_a.weight") or "_a.weight" in k]
    before = {k: adapters[k].detach().clone() for k in a_keys}
    episode = next(iter(learner.episodes(sampler, epoch=1, seed=0)))
    metrics = learner.train_episode(episode)
    assert torch.isfinite(torch.tensor(metrics["inner_nll"]))
    moved = [k for k in a_keys if not torch.equal(before[k], adapters[k])]
    assert moved, "no A factor moved"
    k = moved[0]
    step = (adapters[k] - before[k]).abs()
    step = step[step > 0]
    # The updates are smaller than half a bf16 ulp of the values they were added to.
    half_ulp = before[k].abs().max() * 2.0**-8
    assert step.median() < half_ulp
    seen = []
    hook = model.layers[0].attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.no_grad(), learner.autocast():
        model(episode.support[0]["tokens"])
    hook.remove()
    assert seen == [torch.bfloat16]  # the adapted projection computes in bf16


@pytest.mark.parametrize("make_model,make_learner", [
    (gaussian_lora_tiny_llama, lambda: ABMLL(test_lr=1e-2)),
    (lora_tiny_llama, lambda: RegularLoRA(test_lr=1e-2)),
    (lora_tiny_llama, lambda: StructuredLoRA(test_lr=1e-2)),
    (lora_tiny_llama, lambda: Reptile(test_lr=1e-2)),
    (lora_tiny_llama, lambda: Pretrained(test_lr=1e-2, test_time_adaptation=True)),
])
def test_adapted_restores_adapters_and_flags_even_when_the_block_raises(sampler, make_model, make_learner):
    torch.manual_seed(0)
    model = make_model()
    with torch.no_grad():  # B != 0 so that every factor moves in the adaptation
        for name, p in model.named_parameters():
            if name.endswith("_b.weight"):
                p.normal_(0.0, 0.02)
    learner = make_learner()
    learner.setup(model, torch.device("cpu"))
    params = learner.adapter_params
    before = {k: p.detach().clone() for k, p in params.items()}
    flags = {k: p.requires_grad for k, p in params.items()}
    support, _ = sampler.adaptation_split(sampler.task_names[0], 2, 4)
    with pytest.raises(RuntimeError, match="inside the block"):
        with learner.adapted(support):
            assert any(not torch.equal(before[k], p) for k, p in params.items())  # it adapted
            raise RuntimeError("inside the block")
    assert all(torch.equal(before[k], p) for k, p in params.items())
    assert {k: p.requires_grad for k, p in params.items()} == flags
    assert all(p.grad is None for p in params.values())
