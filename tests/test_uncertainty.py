"""Per-example uncertainty and the metrics made from it, each against an independent
computation (torch.distributions, brute-force loops, scipy, numpy), and the recipe's
predictions file against its own results.json."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from abmll.data import TaskSampler, load_split, option_token_ids
from abmll.evaluation import evaluate_unseen_tasks, read_predictions
from abmll.evaluation.metrics import classification_metrics
from abmll.evaluation.posterior import quantiles
from abmll.evaluation.uncertainty import (
    accuracy_at_coverage,
    apply_temperature,
    aurc,
    decompose,
    entropy,
    fit_temperature,
    selective_metrics,
)
from abmll.learners import ABMLL, Pretrained
from abmll.models import gaussian_lora_tiny_llama, tiny_tokenizer
from abmll.modules import PAIRS, gaussian_lora_modules


def _random_probs(n=40, c=4, seed=0, masked=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * 2
    if masked:  # some examples have fewer options: their missing letters carry 0
        logits[: n // 3, c - 1] = float("-inf")
    probs = torch.softmax(logits, -1)
    labels = torch.randint(0, c - 1, (n,), generator=g)
    return probs, labels


# ------------------------------------------------------------------ decomposition
def test_entropy_matches_torch_distributions_with_zero_probability_options():
    probs, _ = _random_probs()
    ref = torch.distributions.Categorical(probs=probs.double()).entropy()
    assert torch.allclose(entropy(probs), ref, atol=1e-12)


def test_decomposition_against_torch_distributions_and_its_limits():
    g = torch.Generator().manual_seed(1)
    samples = torch.softmax(torch.randn(5, 10, 3, generator=g) * 2, -1)  # S=5 weight samples
    dec = decompose(samples)
    mean = samples.double().mean(0)
    total = torch.distributions.Categorical(probs=mean).entropy()
    expected = torch.distributions.Categorical(probs=samples.double()).entropy().mean(0)
    assert torch.allclose(dec["probs"], mean) and torch.allclose(dec["entropy"], total)
    assert torch.allclose(dec["expected_entropy"], expected)
    assert torch.allclose(dec["mutual_info"], total - expected) and (dec["mutual_info"] > 0).all()
    one = decompose(samples[:1])  # one sample (or the mean mode): no epistemic part
    assert (one["mutual_info"] == 0).all()
    same = decompose(samples[:1].expand(4, -1, -1))  # identical samples: none either
    assert same["mutual_info"].abs().max() < 1e-12


# ------------------------------------------------------------------ selective prediction
def _brute_force_aurc(probs, labels):
    """Independent: rank with Python's stable sorted(), then the mean over k of the error rate
    of the k most confident examples."""
    conf = probs.max(-1).values.tolist()
    correct = (probs.argmax(-1) == labels).tolist()
    order = sorted(range(len(conf)), key=lambda i: -conf[i])
    risks = []
    for k in range(1, len(order) + 1):
        risks.append(sum(1 for i in order[:k] if not correct[i]) / k)
    return sum(risks) / len(risks)


def _brute_force_acc_at(probs, labels, coverage):
    conf = probs.max(-1).values.tolist()
    correct = (probs.argmax(-1) == labels).tolist()
    order = sorted(range(len(conf)), key=lambda i: -conf[i])
    k = max(1, math.ceil(coverage * len(order)))
    return sum(correct[i] for i in order[:k]) / k


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aurc_and_selective_accuracy_against_brute_force(seed):
    probs, labels = _random_probs(n=37, seed=seed)
    assert aurc(probs, labels) == pytest.approx(_brute_force_aurc(probs, labels), abs=1e-12)
    for c in (0.5, 0.8, 0.9, 1.0):
        assert accuracy_at_coverage(probs, labels, c) == pytest.approx(_brute_force_acc_at(probs, labels, c), abs=1e-12)
    assert selective_metrics(probs, labels)["acc_at_80"] == accuracy_at_coverage(probs, labels, 0.8)
    # A deliberately wrong version (least confident first) is caught by the comparison above.
    errors = (probs.argmax(-1) != labels).double()
    ascending = errors[torch.sort(probs.max(-1).values).indices]
    wrong_aurc = (ascending.cumsum(0) / torch.arange(1, len(ascending) + 1)).mean().item()
    assert wrong_aurc != pytest.approx(_brute_force_aurc(probs, labels), abs=1e-3)


def test_aurc_by_hand():
    # Confidences 0.9 (right), 0.8 (wrong), 0.6 (right): risks 0, 1/2, 1/3.
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    labels = torch.tensor([0, 0, 0])
    assert aurc(probs, labels) == pytest.approx((0 + 1 / 2 + 1 / 3) / 3)
    assert accuracy_at_coverage(probs, labels, 0.5) == pytest.approx(0.5)  # ceil(1.5) = 2 examples
    assert accuracy_at_coverage(probs, labels, 0.3) == 1.0


# ------------------------------------------------------------------ temperature scaling
def test_temperature_scaling_of_one_sample_is_softmax_of_logits_over_t():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 3, generator=g, dtype=torch.float64)
    for t in (0.5, 1.0, 3.0):
        assert torch.allclose(apply_temperature(torch.softmax(logits, -1), t), torch.softmax(logits / t, -1))
    probs = torch.tensor([[0.7, 0.3, 0.0]])
    assert apply_temperature(probs, 2.0)[0, 2] == 0  # a missing option stays impossible


def test_fitted_temperature_matches_scipys_minimiser():
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 3, (30,), generator=g)
    logits = torch.randn(30, 3, generator=g, dtype=torch.float64)
    logits[torch.arange(30), labels] += 1.0
    probs = torch.softmax(4 * logits, -1)  # over-confident: the fit should cool it (T > 1)

    def nll(log_t):
        p = apply_temperature(probs, math.exp(log_t))
        return -torch.log(p[torch.arange(30), labels]).mean().item()

    ref = math.exp(minimize_scalar(nll, bounds=(math.log(0.05), math.log(20)), method="bounded").x)
    fit = fit_temperature(probs, labels)
    assert fit > 1 and abs(math.log(fit) - math.log(ref)) < 0.01  # the grid's spacing is 0.0092 in log T
    ts_nll = nll(math.log(fit))
    assert ts_nll <= nll(0.0)  # no worse than T = 1 on the data it was fitted on


# ------------------------------------------------------------------ posterior quantiles
def test_quantiles_match_numpy():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(5))
    got = quantiles(x, (0.01, 0.5, 0.99))
    ref = np.quantile(x.numpy().astype(np.float64), [0.01, 0.5, 0.99])
    assert [got["q01"], got["q50"], got["q99"]] == pytest.approx(list(ref), abs=1e-12)


# ------------------------------------------------------------------ the evaluation
OPTION_IDS = torch.tensor(option_token_ids(tiny_tokenizer()))


def _learner(c=-4.0, seed=0):
    torch.manual_seed(seed)
    model = gaussian_lora_tiny_llama(c=c)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in gaussian_lora_modules(model):
            for p in layer.pair_params(PAIRS):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    learner = ABMLL(inner_steps=2, test_lr=1e-3)
    learner.setup(model.eval(), torch.device("cpu"))
    return learner


def _sampler():
    return TaskSampler(load_split("tiny").test, tiny_tokenizer(), batch_size=2, max_seq_len=256, seed=0,
                       eval_batch_size=4)


def _evaluate(learner, **kw):
    torch.manual_seed(7)
    return evaluate_unseen_tasks(learner, _sampler(), OPTION_IDS, num_support=2, max_eval_examples=8,
                                 desc="test", **kw)


def test_flip_rate_and_temperature_scaling_leave_the_sampled_predictions_untouched():
    plain = _evaluate(_learner(), num_samples=3)
    full = _evaluate(_learner(), num_samples=3, flip_rate=True, temperature_scaling=True, keep_predictions=True)
    assert full["per_task"] == plain["per_task"] and full["pooled"] == plain["pooled"]
    assert 0 <= full["flip"]["flip_rate"] <= 1 and full["flip"]["n"] == plain["pooled"]["n"]
    assert set(full["ts"]["per_task"]) == set(plain["per_task"])
    # At c = -4 with random adapters the samples do move the answers: MI and flips are visible.
    assert full["mean"]["mi"] > 0 and full["flip"]["mean_abs_dp"] > 1e-3


def test_a_list_of_sample_counts_costs_the_largest_and_its_headline_is_that_count():
    learner = _learner()
    calls = []
    handle = learner.model.register_forward_hook(lambda *a: calls.append(1))
    curve = _evaluate(learner, num_samples=[1, 2, 4])
    n_curve = len(calls)
    calls.clear()
    four = _evaluate(learner, num_samples=4)
    handle.remove()
    assert n_curve == len(calls)  # 4 forwards per batch, not 1 + 2 + 4
    assert curve["per_task"] == four["per_task"] and curve["num_samples"] == 4
    assert set(curve["samples_curve"]) == {"1", "2", "4"}
    assert curve["samples_curve"]["4"]["accuracy"] == four["mean"]["accuracy"]
    assert curve["samples_curve"]["1"]["mi"] == 0 and curve["samples_curve"]["4"]["mi"] > 0


def test_pretrained_has_no_epistemic_part_and_no_flips_to_measure():
    torch.manual_seed(0)
    from abmll.models import lora_tiny_llama

    learner = Pretrained()
    learner.setup(lora_tiny_llama().eval(), torch.device("cpu"))
    out = _evaluate(learner, num_samples=3, temperature_scaling=True)
    assert out["mean"]["mi"] < 1e-12 and "flip" not in out and "ts" in out  # identical samples


# ------------------------------------------------------------------ the recipe's files
def test_predictions_on_disk_reproduce_results_json(run_recipe, tmp_path):
    out = tmp_path / "run"
    proc = run_recipe("--config", "tiny/abmll", f"output_dir={out}", "epochs=1", "model.c=-6",
                      "eval.save_predictions=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["predictions"] == "predictions_test.parquet"
    rows = read_predictions(out / res["predictions"])
    assert (out / "predictions_val_epoch1.parquet").exists()
    by_task = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    assert set(by_task) == set(res["test"]["per_task"])

    def tensors(rs, key="probs"):
        width = max(r["num_options"] for r in rs)
        probs = torch.tensor([r[key] + [0.0] * (width - len(r[key])) for r in rs], dtype=torch.float64)
        return probs, torch.tensor([r["label"] for r in rs])

    for task, rs in by_task.items():
        probs, labels = tensors(rs)
        got = classification_metrics(probs, labels)
        want = res["test"]["per_task"][task]
        for k in ("accuracy", "ece", "nll", "brier", "aurc", "acc_at_50", "acc_at_80", "acc_at_90"):
            assert got[k] == pytest.approx(want[k], abs=1e-6), (task, k)
        assert sum(r["mutual_info"] for r in rs) / len(rs) == pytest.approx(want["mi"], abs=1e-9)
        ts_probs, _ = tensors(rs, "probs_ts")
        assert classification_metrics(ts_probs, labels)["nll"] == pytest.approx(res["test_ts"]["per_task"][task]["nll"], abs=1e-6)
        assert {r["temperature"] for r in rs} == {res["test_ts"]["per_task"][task]["temperature"]}
    # The flip rate from the file: one sample per forward, so the predictive is that sample.
    flips = sum(int(np.argmax(r["probs"]) != np.argmax(r["probs_mean_mode"])) for r in rows)
    assert res["posterior"]["flip"]["flip_rate"] == pytest.approx(flips / len(rows))
    assert res["posterior"]["flip"]["n"] == len(rows)
    post = res["posterior"]
    assert post["c"] == -6 and post["all"]["lv_theta"]["q50"] == pytest.approx(-6, abs=0.5)
    assert all(set(v) == {"c", "lv_theta", "lv_phi", "rel_noise_std", "lv_phi_minus_c"} and v["c"] == -6
               for v in post["layers"].values())
    assert post["all"]["lv_phi_minus_c"]["q50"] == pytest.approx(post["all"]["lv_phi"]["q50"] + 6, abs=1e-6)
    assert all(r["line"] == -1 for r in rows)  # built-in tiny tasks have no file


def test_predictions_carry_the_task_files_line(tmp_path):
    from abmll.data.metaicl import read_task_file

    path = tmp_path / "t" / "t_16_100_test.jsonl"
    path.parent.mkdir()
    lines = [json.dumps({"task": "t", "input": f"q{i}", "output": "a", "options": ["a", "b"]}) for i in range(3)]
    lines.insert(1, json.dumps({"task": "t", "input": "x", "output": "a", "options": ["a"]}))  # dropped: 1 option
    path.write_text("\n".join(lines) + "\n")
    examples, _ = read_task_file(path, "t")
    assert [e.line for e in examples] == [1, 3, 4] and examples[1].input == "q1"


def test_c_from_the_base_weights_gives_each_layer_the_asked_relative_noise(run_recipe, tmp_path):
    """c_relative_std = k: per layer c = 2 log(k std(W0)), so at initialisation a weight
    sample's noise std is k times the spread of that layer's W0 (checked on the drawn noise),
    layers with different spreads get different c, and a run records them."""
    from abmll.models import gaussian_lora_tiny_llama
    from abmll.modules import gaussian_lora_modules, set_c_from_base_weights

    torch.manual_seed(0)
    model = gaussian_lora_tiny_llama(lora_attn_modules=["q_proj", "output_proj"])
    with torch.no_grad():
        for i, (_, layer) in enumerate(gaussian_lora_modules(model)):
            layer.weight.mul_(1 + i)  # different spreads
    cs = set_c_from_base_weights(model, 0.05)
    assert len(set(round(c, 6) for c in cs.values())) == len(cs) > 1
    for _, layer in gaussian_lora_modules(model):
        w_std = layer.weight.float().std().item()
        assert layer.c == pytest.approx(2 * math.log(0.05 * w_std), rel=1e-12)
        noise = layer.sample_weight_noise()
        assert noise.std().item() == pytest.approx(0.05 * w_std, rel=0.05)
    with pytest.raises(ValueError, match="c_relative_std must be > 0"):
        set_c_from_base_weights(model, 0.0)

    out = tmp_path / "run"
    proc = run_recipe("--config", "tiny/abmll", f"output_dir={out}", "epochs=1", "c_relative_std=0.05",
                      "data.max_eval_examples_per_task=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "c from the base weights (c_relative_std=0.05)" in proc.stderr
    post = json.loads((out / "results.json").read_text())["posterior"]
    assert isinstance(post["c"], list) and len(post["c"]) > 1  # one c per layer, not one for all
    assert {round(v["c"], 9) for v in post["layers"].values()} == {round(c, 9) for c in post["c"]}
