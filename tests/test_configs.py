"""Every shipped config parses, names importable components, and pairs a learner with a
model of the kind it needs. The Llama3-8B configs build their model on the meta device."""

from importlib.resources import files

import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config
from torchtune.config._utils import _get_component_from_path

FAMILIES = ["tiny", "smollm2_135m", "llama3_8b"]
METHODS = ["abmll", "regular_lora", "structured_lora", "reptile", "pretrained"]
EXPECTED_LEARNER = {
    "abmll": "abmll.learners.ABMLL",
    "regular_lora": "abmll.learners.RegularLoRA",
    "structured_lora": "abmll.learners.StructuredLoRA",
    "reptile": "abmll.learners.Reptile",
    "pretrained": "abmll.learners.Pretrained",
}


def _load(family, method):
    path = files("abmll.configs").joinpath(f"{family}/{method}.yaml")
    text = path.read_text()
    assert text.startswith("# "), "every config starts with a header comment"
    assert f"tune run abmll_recipe --config {family}/{method}" in text, "header says how to run it"
    return OmegaConf.load(str(path))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_config_parses_and_pairs_learner_with_model(family, method):
    cfg = _load(family, method)
    OmegaConf.resolve(cfg)
    assert cfg.learner._component_ == EXPECTED_LEARNER[method]
    assert f"/{method}/" in cfg.output_dir
    for key in ("tokenizer", "model", "metric_logger"):
        _get_component_from_path(cfg[key]._component_)
    if cfg.checkpointer is not None:
        _get_component_from_path(cfg.checkpointer._component_)
    learner = config.instantiate(cfg.learner)
    if family == "llama3_8b":
        with torch.device("meta"):
            model = config.instantiate(cfg.model)
    else:
        model = config.instantiate(cfg.model)
    learner._check_model(model)  # raises if the learner needs another kind of adapter
    assert cfg.model.get("lora_rank", 8) == 8 and cfg.model.get("lora_alpha", 16) == 16
    assert list(cfg.model.lora_attn_modules) == ["q_proj", "v_proj", "output_proj"]
    assert cfg.data.batch_size == 2 and learner.inner_steps == 5


@pytest.mark.parametrize("method", METHODS)
def test_llama3_8b_configs_hold_the_papers_hyperparameters(method):
    cfg = _load("llama3_8b", method)
    assert cfg.epochs == 500 and cfg.dtype == "bf16" and cfg.device == "cuda"
    assert cfg.enable_activation_checkpointing is True
    learner = config.instantiate(cfg.learner)
    assert learner.test_lr == 1e-5
    if method == "abmll":
        assert (learner.inner_lr, learner.outer_lr, learner.beta, learner.a0, learner.b0) == (
            1e-5, 5e-5, 1e-8, 1.0, 0.01)
    if method == "reptile":
        assert learner.lr == 1e-5 and learner.epsilon == 0.5
    if method == "regular_lora":
        assert learner.lr == 5e-5
    if method == "structured_lora":
        assert learner.lr == 1e-5
    if method == "pretrained":
        assert learner.test_time_adaptation is False


def test_llama3_8b_gaussian_and_plain_lora_models_match_in_size():
    from torchtune.modules.peft import get_adapter_params

    sizes = {}
    for method in ("abmll", "reptile"):
        cfg = _load("llama3_8b", method)
        with torch.device("meta"):
            model = config.instantiate(cfg.model)
        adapters = sum(p.numel() for p in get_adapter_params(model).values())
        sizes[method] = (sum(p.numel() for p in model.parameters()) - adapters, adapters)
    assert sizes["abmll"][0] == sizes["reptile"][0] == 8_030_261_248
    assert sizes["abmll"][1] == 4 * sizes["reptile"][1]  # four LoRA pairs against one


def test_offline_default_data_dir_follows_abmll_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ABMLL_CACHE", str(tmp_path))
    cfg = _load("smollm2_135m", "abmll")
    assert cfg.data.data_dir == f"{tmp_path}/bigbench-mc"


def test_abmll_ls_and_cp_use_the_recipe_registry(tmp_path, capsys):
    """`abmll ls` lists what --config accepts; `abmll cp` copies a packaged config, refuses to
    overwrite, and the copy runs through the recipe's resolution as a path."""
    from abmll.config_registry import main, packaged_configs, resolve_config

    names = packaged_configs()
    assert "llama3_8b/abmll" in names and "tiny/pretrained" in names and len(names) == 15
    assert main(["ls"]) == 0 and capsys.readouterr().out.split() == names
    dest = tmp_path / "mine.yaml"
    assert main(["cp", "llama3_8b/abmll", str(dest)]) == 0
    assert dest.read_text() == resolve_config("llama3_8b/abmll").read_text()
    dest.write_text("edited")
    assert main(["cp", "llama3_8b/abmll", str(dest)]) == 2 and dest.read_text() == "edited"
    assert main(["cp", "no/such", str(tmp_path / "x.yaml")]) == 2
    assert "tiny/abmll" in capsys.readouterr().err
    assert resolve_config(str(dest)) == dest
