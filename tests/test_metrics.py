"""Metrics against brute-force loops written out by hand."""

import math

import pytest
import torch

from abmll.evaluation import (
    brier_score,
    classification_metrics,
    expected_calibration_error,
    negative_log_likelihood,
    option_probs,
)


def _brute_force_ece(probs, labels, n_bins):
    n = len(labels)
    bins = [[] for _ in range(n_bins)]
    for p, y in zip(probs.tolist(), labels.tolist()):
        conf = max(p)
        pred = p.index(conf)
        # bin b covers (b/n, (b+1)/n]; confidence 0 goes to the first bin
        b = max(0, math.ceil(conf * n_bins) - 1)
        bins[b].append((conf, pred == y))
    ece = 0.0
    for members in bins:
        if members:
            acc = sum(c for _, c in members) / len(members)
            conf = sum(p for p, _ in members) / len(members)
            ece += len(members) / n * abs(acc - conf)
    return ece


@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_ece_matches_brute_force(n_bins):
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(500, 4, generator=g) * 2, dim=-1).double()
    labels = torch.randint(0, 4, (500,), generator=g)
    assert expected_calibration_error(probs, labels, n_bins) == pytest.approx(
        _brute_force_ece(probs, labels, n_bins), abs=1e-12
    )


def test_ece_bin_edges_are_right_closed():
    # confidence exactly 0.6 with 5 bins belongs to (0.4, 0.6]; one wrong answer there
    probs = torch.tensor([[0.6, 0.4], [0.61, 0.39]], dtype=torch.float64)
    labels = torch.tensor([1, 0])
    assert expected_calibration_error(probs, labels, 5) == pytest.approx(
        _brute_force_ece(probs, labels, 5)
    )
    assert expected_calibration_error(probs, labels, 5) == pytest.approx(0.5 * 0.6 + 0.5 * 0.39)


def test_perfectly_confident_correct_predictions_have_zero_ece():
    probs = torch.eye(3, dtype=torch.float64)
    labels = torch.arange(3)
    m = classification_metrics(probs, labels)
    assert m["accuracy"] == 1.0 and m["ece"] == 0.0 and m["brier"] == 0.0


def test_nll_and_brier_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]])
    labels = torch.tensor([0, 1])
    assert negative_log_likelihood(probs, labels) == pytest.approx(-(math.log(0.7) + math.log(0.5)) / 2)
    b1 = (0.7 - 1) ** 2 + 0.2**2 + 0.1**2
    b2 = 0.5**2 + (0.5 - 1) ** 2
    assert brier_score(probs, labels) == pytest.approx((b1 + b2) / 2)


def test_option_probs_restricts_to_letters_and_masks_missing_options():
    logits = torch.zeros(2, 10)
    logits[:, 3] = 1.0  # letter A
    logits[:, 9] = 50.0  # not a letter: ignored
    logits[1, 6] = 5.0  # letter D of an example that has only 2 options: masked
    ids = torch.tensor([3, 4, 5, 6])
    p = option_probs(logits, ids, torch.tensor([4, 2]))
    e = math.e
    torch.testing.assert_close(p[0], torch.tensor([e, 1, 1, 1]) / (e + 3))
    torch.testing.assert_close(p[1], torch.tensor([e / (e + 1), 1 / (e + 1), 0, 0]))


def test_pruning_zeroes_the_smallest_units_of_every_block_output():
    from torchtune.modules import TransformerSelfAttentionLayer

    from abmll.evaluation import num_pruned, prune_hidden_units
    from abmll.models import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama()
    blocks = [m for m in model.modules() if isinstance(m, TransformerSelfAttentionLayer)]
    tokens = torch.randint(0, 256, (2, 9))
    seen = []
    with torch.no_grad():
        plain = model(tokens)
        with prune_hidden_units(model, 0.1):
            # registered after the pruning hooks, so these see the pruned outputs
            hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o.detach())) for b in blocks]
            pruned = model(tokens)
            for h in hooks:
                h.remove()
        after = model(tokens)
    k = num_pruned(0.1, 64)
    assert k == 7 and len(seen) == 2
    for out in seen:
        assert torch.all((out == 0).sum(-1) == k)
    assert not torch.allclose(plain, pruned)
    torch.testing.assert_close(plain, after)  # hooks removed
    with pytest.raises(ValueError, match="prune_fractions"):
        with prune_hidden_units(model, 1.5):
            pass
