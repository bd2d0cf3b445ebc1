"""Every shipped Llama3-8B, Qwen2-7B and SmolLM2-135M config runs through the recipe end to end.

The paper's configuration (activation checkpointing, bf16, the chat template, 200 evaluation
examples per task, the paper's learning rates) once crashed at the PEFT export after a whole
run, because no test ever ran it (issue #8). Here each config runs as shipped, with only what
a CPU cannot hold swapped out: the model's shape (the tiny model of the same kind, with the
config's own LoRA keys), the base weights (none: random from the seed), the tokenizer (the
tiny one), the device, the data (the built-in tiny split), the number of epochs and the output
directory. The swaps are applied to the loaded YAML, so a key added to a config is kept.

The rows run in-process through ``recipe_main`` (the function ``tune run`` calls, minus its
argument parsing): a ``tune run`` subprocess per row would double the time in imports. One
row, the paper's ABMLL, also runs as ``tune run abmll_recipe --config <file>`` in a subprocess.
"""

from importlib.resources import files
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from test_configs import METHODS  # one list of the packaged methods for both config tests

FAMILIES = ["llama3_8b", "qwen2_7b", "smollm2_135m"]

# The tiny model of the same kind as each shipped model: same builder keys, tiny shape.
TINY_MODEL = {
    "abmll.models.gaussian_lora_llama3_8b": "abmll.models.gaussian_lora_tiny_llama",
    "torchtune.models.llama3.lora_llama3_8b": "abmll.models.lora_tiny_llama",
    "abmll.models.gaussian_lora_smollm2_135m": "abmll.models.gaussian_lora_tiny_llama",
    "abmll.models.lora_smollm2_135m": "abmll.models.lora_tiny_llama",
    "abmll.models.gaussian_lora_qwen2_7b": "abmll.models.gaussian_lora_tiny_qwen2",
    "torchtune.models.qwen2.lora_qwen2_7b": "abmll.models.lora_tiny_qwen2",
}
_ABSENT = object()


def _load(family: str, method: str):
    return OmegaConf.load(str(files("abmll.configs").joinpath(f"{family}/{method}.yaml")))


def _swaps(family: str, method: str, output_dir: Path):
    """What a CPU cannot hold, as config key -> value; the rest of the config stays as shipped."""
    shipped, tiny = _load(family, method), _load("tiny", method)
    return {
        "model._component_": TINY_MODEL[shipped.model._component_],
        "checkpointer": None,  # random base weights from the seed
        "tokenizer": tiny.tokenizer,  # max_seq_len still follows the shipped data.max_seq_len
        "device": "cpu",
        "split": tiny.split,
        "data.data_dir": tiny.data.data_dir,
        "data.split_file": tiny.data.split_file,
        "epochs": 1,
        "output_dir": str(output_dir),
    }


def _cpu_config(family: str, method: str, output_dir: Path):
    cfg = _load(family, method)
    for key, value in _swaps(family, method, output_dir).items():
        # A renamed key must fail here, not silently add a key the recipe ignores.
        assert OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=False) is not _ABSENT, key
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _leaves(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_only_what_a_cpu_cannot_hold_is_swapped(family, method, tmp_path):
    shipped = _leaves(OmegaConf.to_container(_load(family, method), resolve=False))
    cpu = _leaves(OmegaConf.to_container(_cpu_config(family, method, tmp_path), resolve=False))
    swapped = tuple(_swaps(family, method, tmp_path))
    changed = {k for k in shipped.keys() | cpu.keys() if shipped.get(k, _ABSENT) != cpu.get(k, _ABSENT)}
    outside = [k for k in changed if not any(k == s or k.startswith(s + ".") for s in swapped)]
    assert changed and not outside, outside
    if family in ("llama3_8b", "qwen2_7b"):  # the paper's settings reach the run
        assert cpu["enable_activation_checkpointing"] is True and cpu["dtype"] == "bf16"
        assert cpu["data.chat_template"] is True and cpu["data.max_eval_examples_per_task"] == 200


def _run_in_process(cfg) -> int:
    import abmll_recipe

    try:
        abmll_recipe.recipe_main.__wrapped__(cfg)  # undecorated: takes the config directly
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


def _assert_peft_loads(adapter_dir: Path, rank: int, alpha: float, qwen2: bool = False) -> None:
    """Hugging Face PEFT loads every exported tensor onto a tiny transformers Llama (Qwen2 for
    the Qwen2 models)."""
    import json

    from peft import PeftModel
    from test_peft_export import _hf_llama, _hf_qwen2

    from abmll.models import tiny_llama, tiny_qwen2

    base = _hf_qwen2(tiny_qwen2().state_dict()) if qwen2 else _hf_llama(tiny_llama().state_dict())
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (rank, alpha)
    assert sorted(cfg["target_modules"]) == ["o_proj", "q_proj", "v_proj"]
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    hf = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    loaded = {k: v for k, v in hf.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved)  # every LoRA module of the model got its tensors
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key.replace(".weight", ".default.weight")], value.float())
    with torch.no_grad():
        logits = hf(input_ids=torch.randint(0, 256, (1, 9))).logits
    assert torch.isfinite(logits).all()


def _check_run(cfg, out: Path, method: str) -> None:
    import json

    res = json.loads((out / "results.json").read_text())
    assert res["finished"] and res["errors"] == {}
    assert 0.0 <= res["test"]["mean"]["accuracy"] <= 1.0 and len(res["test"]["per_task"]) == 3
    assert res["config"]["enable_activation_checkpointing"] == cfg.enable_activation_checkpointing
    if method == "pretrained":
        assert not (out / "adapter_best").exists()
        return
    for which in ("adapter_best", "adapter_final"):
        keys = list(load_file(out / which / "adapter_model.safetensors"))
        assert len(keys) == 2 * 3 * 2  # 2 layers x (q, v, output) x (A, B)
        assert not [k for k in keys if "_checkpoint_wrapped_module" in k]
    state = torch.load(out / "checkpoints" / "recipe_state.pt", map_location="cpu", weights_only=False)
    assert not [k for k in state["adapters"] if "_checkpoint_wrapped_module" in k]
    _assert_peft_loads(out / "adapter_best", cfg.model.lora_rank, cfg.model.lora_alpha,
                       qwen2="qwen2" in cfg.model._component_)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_shipped_config_runs_end_to_end_at_tiny_shape(family, method, tmp_path):
    out = tmp_path / "run"
    cfg = _cpu_config(family, method, out)
    assert _run_in_process(cfg) == 0
    _check_run(cfg, out, method)


def test_the_papers_abmll_config_runs_under_tune_run(run_recipe, tmp_path):
    """The same swaps, written to a YAML file and run as a user runs it."""
    out = tmp_path / "run"
    cfg = _cpu_config("llama3_8b", "abmll", out)
    path = tmp_path / "llama3_8b_abmll_cpu.yaml"
    OmegaConf.save(cfg, path)
    proc = run_recipe("--config", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_run(cfg, out, "abmll")
