"""dtype: auto — the compute dtype follows the hardware (abmll.precision), and a run records it."""

import json

import pytest
import torch

import abmll.precision as precision
from abmll.precision import resolve_precision

CPU = torch.device("cpu")


def _fake_cpu(monkeypatch, native, slowdown):
    """A CPU whose native bf16 feature is ``native`` and whose probe measures ``slowdown``;
    the probe counts its calls."""
    calls = []
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: native)

    def probe():
        calls.append(1)
        return slowdown

    return probe, calls


@pytest.mark.parametrize("native", ["AVX512_BF16", "AMX"])
def test_auto_is_bf16_on_a_cpu_with_native_bf16_without_probing(monkeypatch, native):
    probe, calls = _fake_cpu(monkeypatch, native, slowdown=9.0)
    p = resolve_precision("auto", CPU, probe=probe)
    assert p.dtype == torch.bfloat16 and p.name == "bf16"
    assert native in p.reason and not calls
    assert not p.slow_bf16


def test_auto_is_fp32_on_an_avx2_only_cpu_and_says_why(monkeypatch):
    probe, calls = _fake_cpu(monkeypatch, None, slowdown=9.1)
    p = resolve_precision("auto", CPU, probe=probe)
    assert p.dtype == torch.float32 and len(calls) == 1
    assert "no native bf16" in p.reason and "9.1x" in p.reason
    rec = p.record()
    assert rec["dtype"] == "fp32" and rec["requested"] == "auto" and rec["bf16_slowdown"] == 9.1
    assert rec["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert rec["threads"] == torch.get_num_threads()
    assert "fp32" in p.describe() and "auto" in p.describe()


def test_auto_takes_bf16_where_the_probe_finds_it_no_slower(monkeypatch):
    probe, _ = _fake_cpu(monkeypatch, None, slowdown=0.6)  # e.g. an Arm CPU with bf16
    p = resolve_precision("auto", CPU, probe=probe)
    assert p.dtype == torch.bfloat16 and "0.60x" in p.reason


def test_explicit_bf16_on_a_slow_cpu_runs_as_asked_and_warns_with_the_factor(monkeypatch):
    probe, calls = _fake_cpu(monkeypatch, None, slowdown=9.1)
    p = resolve_precision("bf16", CPU, probe=probe)
    assert p.dtype == torch.bfloat16 and p.slow_bf16 and len(calls) == 1
    assert "9.1x slower" in p.slow_bf16_warning()


def test_explicit_bf16_on_a_native_cpu_does_not_probe_or_warn(monkeypatch):
    probe, calls = _fake_cpu(monkeypatch, "AVX512_BF16", slowdown=9.1)
    p = resolve_precision("bf16", CPU, probe=probe)
    assert p.dtype == torch.bfloat16 and not p.slow_bf16 and not calls


def test_explicit_fp32_never_probes(monkeypatch):
    probe, calls = _fake_cpu(monkeypatch, None, slowdown=9.1)
    assert resolve_precision("fp32", CPU, probe=probe).dtype == torch.float32 and not calls


@pytest.mark.parametrize("supported,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cuda_follows_the_devices_bf16_support(monkeypatch, supported, expected):
    probe, calls = _fake_cpu(monkeypatch, None, slowdown=9.1)
    p = resolve_precision("auto", torch.device("cuda"), probe=probe, cuda_bf16=lambda: supported)
    assert p.dtype == expected and p.device == "cuda" and not calls
    assert ("supports bf16" if supported else "does not support bf16") in p.reason


def test_auto_on_cuda_uses_torchtunes_check_by_default(monkeypatch):
    from torchtune.training import precision as tt_precision

    monkeypatch.setattr(tt_precision, "verify_bf16_support", lambda: True)
    assert resolve_precision("auto", torch.device("cuda")).dtype == torch.bfloat16


def test_an_unknown_dtype_names_the_key():
    with pytest.raises(ValueError, match=r"^dtype: .*fp23"):
        resolve_precision("fp23", CPU)


def test_the_probe_measures_a_positive_ratio():
    ratio = precision.bf16_matmul_slowdown(rows=8, d_in=32, d_out=32, repeats=1)
    assert ratio > 0 and ratio == ratio  # finite, not NaN


def test_a_run_records_the_resolved_dtype(run_recipe, tmp_path):
    out = tmp_path / "run"
    proc = run_recipe("--config", "tiny/pretrained", f"output_dir={out}", "dtype=auto")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads((out / "results.json").read_text())["precision"]
    expected = resolve_precision("auto", CPU, probe=precision.bf16_matmul_slowdown)
    assert rec["requested"] == "auto" and rec["dtype"] == expected.name
    assert rec["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert f"compute dtype {expected.name} (dtype: auto)" in proc.stdout + proc.stderr
