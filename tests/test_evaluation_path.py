"""The evaluation path: option probabilities against the full-vocabulary logits, sample
averaging, the mean mode, pruning, and the recipe testing with the best epoch's adapters."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn
from torchtune.modules import TransformerSelfAttentionLayer

from abmll.data import TaskSampler, load_split, option_token_ids
from abmll.evaluation import predict_option_probs, prune_hidden_units
from abmll.models import gaussian_lora_tiny_llama, tiny_llama, tiny_tokenizer
from abmll.modules import PAIRS, gaussian_lora_modules, set_gaussian_mode

REPO = Path(__file__).resolve().parents[1]
OPTION_IDS = torch.tensor(option_token_ids(tiny_tokenizer()))


@pytest.fixture(scope="module")
def batch():
    """Eight test examples of a task with 2-4 options (so some letters must get 0)."""
    split = load_split("tiny")
    sampler = TaskSampler(split.test, tiny_tokenizer(), batch_size=8, max_seq_len=256, seed=0)
    _, eval_batches = sampler.adaptation_split("longest_word", 1, 8)
    b = eval_batches[0]
    assert len(set(b["num_options"].tolist())) > 1 and len(set(b["answer_pos"].tolist())) > 1
    return b


def _model(seed=0):
    """Tiny Gaussian-LoRA model with every adapter matrix random (mu_phi != mu_theta) and a
    log-variance at which sampling visibly moves the outputs."""
    torch.manual_seed(seed)
    model = gaussian_lora_tiny_llama(c=-4.0)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in gaussian_lora_modules(model):
            for p in layer.pair_params(PAIRS):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _probs_at(logits, batch, offset):
    """Softmax over the option letters of the logits at ``answer_pos + offset``, letters past
    an example's options excluded, written out independently of abmll.evaluation."""
    rows = torch.arange(logits.size(0))
    letters = logits[rows, batch["answer_pos"] + offset][:, OPTION_IDS].double()
    out = torch.zeros_like(letters)
    for i, n in enumerate(batch["num_options"].tolist()):
        out[i, :n] = torch.softmax(letters[i, :n], dim=-1)
    return out.float()


@torch.no_grad()
def test_option_probs_are_the_full_logits_at_the_position_before_the_answer(batch):
    model = _model()
    set_gaussian_mode(model, "mean")
    probs = predict_option_probs(model, batch, OPTION_IDS)
    logits = model(batch["tokens"])
    expected = _probs_at(logits, batch, -1)
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
    # an off-by-one would read other logits, and this data tells them apart
    for offset in (0, -2):
        assert (_probs_at(logits, batch, offset) - expected).abs().max() > 1e-2, offset
    # letters beyond an example's options get exactly 0; rows sum to 1
    for i, n in enumerate(batch["num_options"].tolist()):
        assert torch.all(probs[i, n:] == 0) and torch.all(probs[i, :n] > 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.size(0)))


@pytest.mark.parametrize("tied", [False, True])
@torch.no_grad()
def test_option_logits_are_float32_from_a_bf16_model(batch, tied):
    """In bf16 the options' logits come from the bf16 hidden state and the options' rows of the
    output weight in float32, not from a bf16 matmul whose output is rounded to bf16 (where
    options tie and an answer moves a whole step); nn.Linear and torchtune's TiedLinear."""
    from torchtune.modules import TiedLinear

    from abmll.objectives import final_hidden_states, logits_at, option_logits_at

    torch.manual_seed(0)
    model = tiny_llama()
    if tied:  # as torchtune's llama3_2 and SmolLM2 builders: not a module, so not registered
        del model.output
        model.output = TiedLinear(model.tok_embeddings)
    model = model.to(torch.bfloat16).eval()
    weight = model.tok_embeddings.weight if tied else model.output.weight
    with torch.no_grad():
        weight.mul_(8)  # answer logits of the magnitude a real model's have (bf16 steps ~0.06)
    hidden = final_hidden_states(model, batch["tokens"])
    assert hidden.dtype == torch.bfloat16
    rows, cols = torch.arange(hidden.size(0)), batch["answer_pos"] - 1
    got = option_logits_at(model, hidden, rows, cols, OPTION_IDS)
    expected = hidden[rows, cols].double() @ weight[OPTION_IDS].double().t()  # written out in float64
    assert got.dtype == torch.float32 and got.shape == (len(rows), len(OPTION_IDS))
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-5)
    # What it replaces: the bf16 output projection's logits, rounded to bf16, are off by far more.
    rounded = logits_at(model, hidden, rows, cols)[:, OPTION_IDS].double()
    assert (rounded - expected).abs().max() > 1e-3


@torch.no_grad()
def test_num_samples_averages_single_sample_predictions_on_the_same_rng_stream(batch):
    model = _model()
    set_gaussian_mode(model, "sample")
    torch.manual_seed(5)
    averaged = predict_option_probs(model, batch, OPTION_IDS, num_samples=3)
    torch.manual_seed(5)
    singles = [predict_option_probs(model, batch, OPTION_IDS, num_samples=1) for _ in range(3)]
    torch.testing.assert_close(averaged, sum(singles) / 3, rtol=1e-6, atol=1e-7)
    # the samples do differ, so the average is not one of them by accident
    assert (singles[0] - singles[1]).abs().max() > 1e-3
    assert (averaged - singles[0]).abs().max() > 1e-4


@torch.no_grad()
def test_mean_mode_is_deterministic_and_equals_the_w0_plus_mu_phi_model(batch):
    model = _model()
    # the reference: a plain decoder whose adapted weights are W0 + s * B_mu_phi A_mu_phi
    plain = tiny_llama()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()})
    plain_modules = dict(plain.named_modules())
    for name, layer in gaussian_lora_modules(model):
        b, a = layer.lora_mu_phi_b.weight, layer.lora_mu_phi_a.weight
        plain_modules[name].weight.add_(layer.scale * (b @ a))
    expected = _probs_at(plain(batch["tokens"]), batch, -1)

    set_gaussian_mode(model, "mean")
    torch.manual_seed(0)
    first = predict_option_probs(model, batch, OPTION_IDS)
    torch.manual_seed(1)
    second = predict_option_probs(model, batch, OPTION_IDS)
    assert torch.equal(first, second)  # no randomness: another seed, the same numbers
    three = predict_option_probs(model, batch, OPTION_IDS, num_samples=3)
    torch.testing.assert_close(three, first, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-5)
    # and the mean is not what sampling gives
    set_gaussian_mode(model, "sample")
    assert (predict_option_probs(model, batch, OPTION_IDS) - first).abs().max() > 1e-3


# --- pruning ------------------------------------------------------------------------------


class _FixedOutput(TransformerSelfAttentionLayer):
    """A transformer block whose output is a given tensor, so the pruned units are known."""

    def __init__(self, out: torch.Tensor):
        nn.Module.__init__(self)
        self.out = out

    def forward(self, x, **kwargs):
        return self.out.clone()


def test_pruning_zeroes_exactly_the_smallest_magnitude_units_per_token():
    hidden = torch.tensor(
        [[[-5.0, 0.1, 3.0, -0.2, 4.0, 0.3, -6.0, 2.0],
          [0.5, -0.05, 7.0, 1.0, -0.01, 9.0, -3.0, 0.4]]]
    )
    block = _FixedOutput(hidden)
    model = nn.Sequential(block)
    x = torch.zeros(1, 2, 8)
    # smallest |h|: token 0 units 1 (0.1), 3 (|-0.2|), 5 (0.3); token 1 units 4, 1, 7.
    # largest |h| or smallest signed h would pick units 6, 0 (token 0) instead.
    zeroed = {0.25: [[1, 3], [4, 1]], 0.3: [[1, 3, 5], [4, 1, 7]]}
    for fraction, units in zeroed.items():
        expected = hidden.clone()
        for t, idx in enumerate(units):
            expected[0, t, idx] = 0.0
        with prune_hidden_units(model, fraction):
            assert torch.equal(model(x), expected), fraction
    assert torch.equal(model(x), hidden)  # the hooks are gone on exit


@torch.no_grad()
def test_pruning_on_a_real_decoder_zeroes_the_smallest_units_of_each_block_output():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    tokens = torch.randint(0, 256, (2, 9))
    first_block = model.layers[0]
    seen = {}

    def capture(module, inputs, output):
        seen["out"] = output.detach().clone()

    handle = first_block.register_forward_hook(capture)
    clean_logits = model(tokens)
    clean = seen["out"]
    handle.remove()

    fraction, k = 0.1, 7  # ceil(0.1 * 64)
    with prune_hidden_units(model, fraction):
        # registered after the pruning hook, so it sees the pruned output
        handle = first_block.register_forward_hook(capture)
        pruned_logits = model(tokens)
        handle.remove()
    pruned = seen["out"]
    smallest = clean.abs().topk(k, dim=-1, largest=False).indices
    expected = clean.scatter(-1, smallest, 0.0)
    assert torch.equal(pruned, expected)
    assert torch.all((pruned == 0).sum(-1) == k) and not torch.any(clean == 0)
    assert not torch.allclose(pruned_logits, clean_logits)


# --- the recipe tests with the best epoch's adapters ----------------------------------------


def _run_recipe_in_process(tmp_path, val_accuracies, name):
    """Run the tiny ABMLL recipe in-process for ``len(val_accuracies)`` epochs.

    Validation runs for real; only the accuracy the recipe selects the best epoch by is
    replaced by ``val_accuracies`` (one per epoch), which makes the best epoch known in
    advance. eval.mode=mean makes the test evaluation (adaptation included) deterministic
    given the adapters, so it can be repeated here. Returns the recipe, its results.json and
    the adapters read back from the checkpoint after every epoch.
    """
    import abmll_recipe

    cfg = OmegaConf.load(REPO / "abmll" / "configs" / "tiny" / "abmll.yaml")
    cfg.output_dir = str(tmp_path / name)
    cfg.epochs = len(val_accuracies)
    cfg.eval.mode = "mean"
    cfg.data.max_eval_examples_per_task = 6
    recipe = abmll_recipe.ABMLLRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)

    scripted = iter(val_accuracies)
    real_evaluate = recipe.evaluate

    def evaluate(sampler, desc, **kw):
        result = real_evaluate(sampler, desc, **kw)
        if desc.startswith("val"):
            result["mean"]["accuracy"] = next(scripted)
        return result

    checkpoints = {}
    real_save = recipe.save_checkpoint

    def save_checkpoint(epoch):
        real_save(epoch)
        state = torch.load(recipe.run.checkpoint, weights_only=False)
        checkpoints[epoch] = state["adapters"]

    recipe.evaluate = evaluate
    recipe.save_checkpoint = save_checkpoint
    recipe.train()
    recipe.finish()
    results = json.loads((Path(cfg.output_dir) / "results.json").read_text())
    return recipe, real_evaluate, results, checkpoints


def _peft(out_dir):
    return load_file(out_dir / "adapter_model.safetensors")


def test_recipe_tests_with_the_best_epochs_adapters_and_exports_best_and_final(tmp_path):
    recipe, evaluate, results, ckpts = _run_recipe_in_process(tmp_path, [0.9, 0.1, 0.5], "best1")
    try:
        assert results["best_epoch"] == 1 and results["epochs"] == 3
        assert [h["val"]["accuracy"] for h in results["history"]] == [0.9, 0.1, 0.5]

        recipe.load_adapters(ckpts[1])
        with_best = evaluate(recipe.test_sampler, "test again")
        assert results["test"]["mean"] == with_best["mean"]
        assert results["test"]["per_task"] == with_best["per_task"]
        # and not what the last epoch's adapters give (so the test above can fail)
        recipe.load_adapters(ckpts[3])
        with_last = evaluate(recipe.test_sampler, "test last")
        assert with_last["mean"] != with_best["mean"]

        out = Path(results["config"]["output_dir"])
        best, final = _peft(out / "adapter_best"), _peft(out / "adapter_final")
        assert best.keys() == final.keys()
        assert any(not torch.equal(best[k], final[k]) for k in best)
        # v_proj is not permuted by the converter: adapter_best is epoch 1's mean pair
        key = "base_model.model.model.layers.0.self_attn.v_proj.lora_{}.weight"
        src = "layers.0.attn.v_proj.lora_mu_theta_{}.weight"
        for peft_ab, ab, epoch, exported in (("A", "a", 1, best), ("B", "b", 1, best),
                                             ("A", "a", 3, final), ("B", "b", 3, final)):
            assert torch.equal(exported[key.format(peft_ab)], ckpts[epoch][src.format(ab)])
    finally:
        recipe.cleanup()


def test_recipe_exports_identical_best_and_final_when_the_last_epoch_is_best(tmp_path):
    recipe, evaluate, results, ckpts = _run_recipe_in_process(tmp_path, [0.1, 0.9], "best2")
    try:
        assert results["best_epoch"] == 2
        recipe.load_adapters(ckpts[2])
        assert results["test"]["mean"] == evaluate(recipe.test_sampler, "test again")["mean"]
        out = Path(results["config"]["output_dir"])
        best, final = _peft(out / "adapter_best"), _peft(out / "adapter_final")
        assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)
    finally:
        recipe.cleanup()
