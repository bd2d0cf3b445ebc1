"""``compile: true`` (torch.compile of each transformer layer, abmll.compiling) computes the run
``compile: false`` computes, up to rounding; a value that is not a bool is refused; the option
may change on resume; the benchmark's ``--compile``."""

import pytest

from test_recipe import _flat, _numbers, _ok, _results

#: A short tiny run: two training steps, no validation (the test uses the last epoch), no flip
#: rate (mean mode would compile once more). Compiling it takes about 2 minutes on 2 CPU cores.
_SHORT = ["epochs=1", "max_steps_per_epoch=2", "data.max_eval_examples_per_task=4",
          "eval.validate=false", "eval.flip_rate=false"]


@pytest.mark.slow
def test_compiled_run_gives_the_eager_runs_numbers(run_recipe, tmp_path):
    """The default estimator (weight) through the recipe; local's compiled layer is checked on
    its own below (a second compiled run costs ~2 min with an empty compile cache)."""
    # fallback_random keeps eager's random draws (abmll.compiling): without it the Gaussian noise
    # would differ and the numbers with it (measured: 1.7e-4 relative on the test NLL).
    args = ["--config", "tiny/abmll", "model.sampling=weight", *_SHORT]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    _ok(run_recipe(*args, f"output_dir={eager}"))
    # Through `tune run`: the compile settings are process-wide, and stay out of the test process.
    _ok(run_recipe(*args, f"output_dir={compiled}", "compile=true", launcher=True, timeout=900))
    expected, got = _flat(_numbers(_results(eager))), _flat(_numbers(_results(compiled)))
    assert got.keys() == expected.keys()
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-6, nan_ok=True)
    assert _results(compiled)["config"]["compile"] is True


_LOCAL_LAYER = """
import json, torch
from abmll.compiling import compile_module
from abmll.modules import GaussianLoRALinear

def run(layer):
    torch.manual_seed(3)
    x = torch.randn(2, 5, 24, requires_grad=True)
    out = layer(x)
    grads = torch.autograd.grad((out * out).sum(), [x, layer.lora_mu_phi_b.weight, layer.lora_lv_phi_a.weight])
    return [out] + list(grads)

torch.manual_seed(0)
layer = GaussianLoRALinear(24, 16, rank=4, alpha=8, c=-4.0, sampling="local")
for p in layer.pair_params(("mu_phi", "lv_phi")):
    torch.nn.init.normal_(p, std=0.3)
eager = run(layer)
compile_module(layer)
compiled = run(layer)
print(json.dumps([float((a - b).abs().max() / b.abs().max()) for a, b in zip(compiled, eager)]))
"""


@pytest.mark.slow
def test_a_compiled_local_layer_gives_eagers_outputs_and_gradients():
    """Local reparameterisation's checkpointed noise, compiled: the same output and gradients
    as eager from the same seed (eager's random draws, abmll.compiling)."""
    import json
    import subprocess
    import sys

    # In a process of its own: the compile settings are process-wide.
    proc = subprocess.run([sys.executable, "-c", _LOCAL_LAYER], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rel = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rel) == 4 and max(rel) < 1e-5, rel


@pytest.mark.parametrize("value", ["1", "fast", "'true'", "null"])
def test_a_compile_that_is_not_a_bool_is_refused(run_recipe, tmp_path, value):
    out = tmp_path / "run"
    proc = run_recipe("--config", "tiny/abmll", f"output_dir={out}", f"compile={value}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("abmll_recipe: error: config key 'compile' must be true or false, got "), last
    assert not out.exists()  # refused before anything was written


def test_compile_is_a_known_key_and_may_change_on_resume():
    from omegaconf import OmegaConf

    from abmll.config_keys import check_config_keys
    from abmll.run_contract import check_resume_config

    check_config_keys(OmegaConf.create({"compile": True}))
    # A checkpoint written before the key existed ran eagerly; either value may continue it.
    old = {"seed": 0, "model": {"sampling": "local"}, "data": {"num_demonstrations": 0}}
    for now in (True, False):
        check_resume_config({**old, "compile": now}, old)
        check_resume_config(old, {**old, "compile": now})


def test_the_benchmark_refuses_compile_without_warmup(capsys):
    from abmll.benchmark.cli import benchmark_main

    with pytest.raises(SystemExit) as stop:
        benchmark_main(["--compile", "--warmup", "0"])
    assert stop.value.code == 2
    assert "--compile needs --warmup >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_time_layer_compiled_times_the_rounds_after_warmup():
    import subprocess
    import sys

    # In a process of its own: the compile settings are process-wide.
    code = ("import json; from abmll.benchmark.measure import time_layer; "
            "print(json.dumps(time_layer(24, 16, 8, rounds=1, warmup=1, compile=True)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["compile"] is True
    for label in ("lora", "local", "weight"):
        assert len(res["seconds"][label]) == 1 and len(res["warmup_seconds"][label]) == 1
    # As in eager (test_benchmark.py), local keeps what LoRA keeps, plus, compiled, the CPU
    # generator's state (5056 bytes) that the compiled checkpoint saves as a tensor to recompute
    # the noise.
    import torch

    rng_state = torch.get_rng_state().numel()
    assert res["saved_bytes"]["local"] == res["saved_bytes"]["lora"] + rng_state
    assert res["saved_bytes"]["weight"] == res["saved_bytes"]["lora"] > 0
