"""The GPU prediction (abmll.benchmark.predict): fake tensors count what real ones hold, the
depth line holds, and the committed table is what the code computes (the FLOP counter itself,
CPU attention included: tests/test_flops.py)."""

import json
from pathlib import Path

import pytest
import torch

from abmll.benchmark import predict

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "results" / "gpu_prediction" / "predictions.json"


@pytest.mark.parametrize("config", ["tiny/abmll", "tiny/regular_lora"])
@pytest.mark.parametrize("ac", [True, False])
def test_fake_episode_counts_what_real_tensors_hold(config, ac):
    """The same episode on fake and on real CPU tensors: the same peak bytes of every kind and
    the same FLOPs (the prediction's memory is MemTracker's, not a formula)."""
    kw = dict(num_layers=2, activation_checkpointing=ac, seq_len=256)
    fake = predict.fake_episode(config, fake=True, **kw)
    real = predict.fake_episode(config, fake=False, **kw)
    assert fake["peak_bytes"] == real["peak_bytes"]
    assert fake["peak_total_bytes"] == real["peak_total_bytes"] > 0
    for key in ("flops_inner_step", "flops_eval_example"):
        assert fake[key] == real[key] > 0, key
    assert fake["flops_outer"] == real["flops_outer"] >= 0


def test_activation_checkpointing_lowers_the_tracked_activations():
    """At a shape where it must (4 layers of 8 x 1024 activations), checkpointing holds fewer
    activation bytes: the FLOP counter's module hooks, which keep every output alive, are kept
    out of the memory episode."""
    kw = dict(num_layers=2, seq_len=512, fake=True)
    on = predict.fake_episode("tiny/regular_lora", activation_checkpointing=True, **kw)
    off = predict.fake_episode("tiny/regular_lora", activation_checkpointing=False, **kw)
    assert on["peak_bytes"]["Activation"] < off["peak_bytes"]["Activation"]
    assert on["flops_inner_step"] > off["flops_inner_step"]  # the recomputed forwards


def test_straight_line_through_two_depths():
    assert predict._line({2: 10.0, 4: 16.0}, 32) == pytest.approx(100.0)
    assert predict._line({2: 10.0, 4: 16.0}, 3) == pytest.approx(13.0)


def test_epoch_flops_and_hours_by_hand():
    pred = {"flops_episode": 6e12, "flops_inner_step": 1e12, "flops_eval_example": 2e11}
    e = predict.epoch_flops(pred, train_tasks=10, val_tasks=3, eval_examples=100, inner_steps=5)
    assert e == {"train": 6e13, "validation": 3 * (5e12 + 2e13), "total": 6e13 + 7.5e13}
    assert predict.hours(312e12 * 0.5 * 3600, "A100", mfu=0.5) == pytest.approx(1.0)


@pytest.mark.slow
def test_llama3_8b_line_and_the_committed_ratio():
    """At Llama3-8B's width: the line through 1 and 2 layers gives the 3-layer episode's peak and
    FLOPs, and the committed table's ABMLL / Regular LoRA ratio (activation checkpointing on) is
    what the code computes now."""
    preds = {m: predict.predict_episode(f"llama3_8b/{m}", activation_checkpointing=True,
                                        fit_layers=(1, 2), check_layers=3 if m == "abmll" else None)
             for m in ("abmll", "regular_lora")}
    chk = preds["abmll"]["check"]
    assert chk["line_flops_inner_step"] == pytest.approx(chk["flops_inner_step"], rel=1e-6)
    assert chk["line_peak_total_bytes"] == pytest.approx(chk["peak_total_bytes"], rel=0.01)
    committed = {(p["method"], p["activation_checkpointing"]): p for p in json.loads(COMMITTED.read_text())
                 if p["model"] == "llama3_8b"}
    ratio_now = preds["abmll"]["peak_total_bytes"] / preds["regular_lora"]["peak_total_bytes"]
    ratio_table = (committed[("ABMLL", True)]["peak_total_bytes"]
                   / committed[("RegularLoRA", True)]["peak_total_bytes"])
    assert ratio_now == pytest.approx(ratio_table, rel=0.01)
