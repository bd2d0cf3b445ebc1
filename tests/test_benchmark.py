"""scripts/benchmark.py and its helpers in abmll.benchmark (no timing asserts)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from abmll.benchmark.measure import time_layer
from abmll.cache import OFFLINE_ENV
from abmll.benchmark.probes import SavedTensorMeter

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_saved_tensor_meter_counts_only_tensors_alive_at_once():
    """Two steps in a row: the first step's tensors are freed by its backward, so the peak is
    one step's, not the sum (a count kept per forward would add stale tensors)."""
    lin = torch.nn.Linear(16, 16)
    meter = SavedTensorMeter(lin, list(lin.parameters()))
    x = torch.randn(8, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        for _ in range(2):
            y = torch.tanh(lin(x))  # saves x and tanh's output
            y.sum().backward()
        one_step = meter.peak
        assert meter.current == 0
        a = torch.tanh(lin(x))
        b = torch.tanh(lin(x))  # two graphs alive: x counted once
        both = meter.current
        del a, b
    assert one_step == x.numel() * 4 + 8 * 16 * 4
    assert both == x.numel() * 4 + 2 * 8 * 16 * 4
    assert meter.current == 0 and meter.peak == both


def test_time_layer_reports_both_samplings_and_equal_saved_bytes():
    res = time_layer(24, 16, 8, rounds=1, warmup=0)
    assert set(res["seconds"]) == {"lora", "local", "weight"}
    assert all(len(v) == 1 and v[0] > 0 for v in res["seconds"].values())
    assert res["saved_bytes"]["local"] == res["saved_bytes"]["weight"] == res["saved_bytes"]["lora"] > 0


@pytest.mark.slow
def test_benchmark_script_tiny(tmp_path):
    env = dict(os.environ, **OFFLINE_ENV)
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "benchmark.py"), "--config-pair", "tiny", "--seq-len", "32",
         "--rounds", "1", "--warmup", "0", "--threads", "1", "--layer-shape", "48x32", "--layer-tokens", "8",
         "--sampling", "weight", "--json", str(tmp_path / "b.json")],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for row in ("| Episode time (mean) |", "| Training tokens / s", "| Saved for backward",
                "| Peak memory: RSS during training", "| Layer 48x32 fwd+bwd, 8 tokens, fp32, sampling local",
                "| Layer 48x32 fwd+bwd, 8 tokens, fp32, sampling weight",
                "| Episode FLOPs (matmuls and attention, one untimed episode) |",
                "| Share of the FLOP floor reached (FLOP ratio / mean time ratio) |",
                "| Layer 48x32, sampling local: FLOPs (share of the floor reached",
                "| Layer 48x32, sampling weight: FLOPs (share of the floor reached"):
        assert row in out, out
    assert "ABMLL sampling weight" in out and "random weights" in out
    data = json.loads((tmp_path / "b.json").read_text())
    timing = data["timing"]
    assert set(timing["episode_seconds"]) == {"abmll", "regular_lora"}
    assert timing["sampling"] == {"abmll": "weight", "regular_lora": None}
    assert timing["query_batches"] == {"abmll": 1, "regular_lora": 0}
    assert timing["seq_len"] == 32 and timing["threads"] == 1
    assert data["memory"]["abmll"]["sampling"] == "weight"
    assert data["memory"]["abmll"]["method"] == "ABMLL"
    floor = data["flop_floor"]["episode"]
    assert floor["sampling"] == "weight" and 0 < timing["episode_flops"]["regular_lora"] < timing["episode_flops"]["abmll"]
    assert floor["flop_ratio"] == timing["episode_flops"]["abmll"] / timing["episode_flops"]["regular_lora"]
    assert floor["floor_share"] == floor["flop_ratio"] / floor["time_ratio"]
    layer = data["flop_floor"]["layers"][0]
    assert set(layer) == {"local", "weight"} and layer["local"]["flops"] > layer["weight"]["flops"] > layer["local"]["lora_flops"]


def test_the_command_lines_sampling_choices_are_the_layers():
    from abmll.benchmark.cli import SAMPLING_CHOICES
    from abmll.modules.gaussian_lora import SAMPLINGS

    assert SAMPLING_CHOICES == SAMPLINGS
