"""Every shipped config parses, names importable components, and pairs a learner with a
model of the kind it needs. The Llama3-8B and Qwen2-7B configs build their model on the meta device."""

from importlib.resources import files

import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config
from torchtune.config._utils import _get_component_from_path

FAMILIES = ["tiny", "smollm2_135m", "llama3_8b", "qwen2_7b"]
#: The paper-scale families: the paper's settings, models built on the meta device only.
LARGE_FAMILIES = ["llama3_8b", "qwen2_7b"]
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
    if family in LARGE_FAMILIES:
        with torch.device("meta"):
            model = config.instantiate(cfg.model)
    else:
        model = config.instantiate(cfg.model)
    learner._check_model(model)  # raises if the learner needs another kind of adapter
    assert cfg.model.get("lora_rank", 8) == 8 and cfg.model.get("lora_alpha", 16) == 16
    assert list(cfg.model.lora_attn_modules) == ["q_proj", "v_proj", "output_proj"]
    assert cfg.data.batch_size == 2 and learner.inner_steps == 5


@pytest.mark.parametrize("family", LARGE_FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_large_model_configs_hold_the_papers_hyperparameters(family, method):
    cfg = _load(family, method)
    assert cfg.data.chat_template is True and cfg.data.max_seq_len == 1024
    assert cfg.data.max_eval_examples_per_task == 200 and cfg.data.eval_batch_size == 8
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


# (base parameters, layers, embed dim, kv dim): Llama3-8B and Qwen2-7B (untied embeddings; the
# Qwen2 total includes its q/k/v biases). The totals equal torchtune's llama3_8b() / qwen2_7b().
LARGE_SHAPES = {
    "llama3_8b": (8_030_261_248, 32, 4096, 1024),
    "qwen2_7b": (7_615_616_512, 28, 3584, 512),
}


@pytest.mark.parametrize("family", LARGE_FAMILIES)
def test_large_gaussian_and_plain_lora_models_match_in_size(family):
    """Gaussian and plain LoRA share the base; the adapters are r(d_in + d_out) per adapted
    projection (q: d -> d, v: d -> kv, output: d -> d) for LoRA and four such pairs for Gaussian."""
    from torchtune.modules.peft import get_adapter_params

    base, layers, d, kv = LARGE_SHAPES[family]
    sizes = {}
    for method in ("abmll", "regular_lora", "reptile"):
        cfg = _load(family, method)
        with torch.device("meta"):
            model = config.instantiate(cfg.model)
        adapters = sum(p.numel() for p in get_adapter_params(model).values())
        sizes[method] = (sum(p.numel() for p in model.parameters()) - adapters, adapters)
    r = _load(family, "abmll").model.lora_rank
    lora = layers * r * ((d + d) + (d + kv) + (d + d))
    assert sizes["regular_lora"] == sizes["reptile"] == (base, lora)
    assert sizes["abmll"] == (base, 4 * lora)  # four LoRA pairs against one


def test_large_base_parameter_counts_are_torchtunes_models():
    from torchtune.models.llama3 import llama3_8b
    from torchtune.models.qwen2 import qwen2_7b

    with torch.device("meta"):
        for family, build in (("llama3_8b", llama3_8b), ("qwen2_7b", qwen2_7b)):
            assert sum(p.numel() for p in build().parameters()) == LARGE_SHAPES[family][0], family


def test_qwen2_7b_configs_read_the_hf_download_dir():
    """What `tune download Qwen/Qwen2-7B-Instruct --output-dir /tmp/Qwen2-7B-Instruct` gives."""
    for method in METHODS:
        cfg = _load("qwen2_7b", method)
        ckpt = cfg.checkpointer
        assert ckpt._component_ == "torchtune.training.FullModelHFCheckpointer"
        assert ckpt.model_type == "QWEN2"
        assert list(ckpt.checkpoint_files) == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
        assert cfg.tokenizer._component_ == "torchtune.models.qwen2.qwen2_tokenizer"
        assert cfg.tokenizer.path == f"{ckpt.checkpoint_dir}/vocab.json"
        assert cfg.tokenizer.merges_file == f"{ckpt.checkpoint_dir}/merges.txt"
        assert cfg.base_model_name_or_path == "Qwen/Qwen2-7B-Instruct"
        raw = OmegaConf.to_container(cfg, resolve=False)
        assert raw["output_dir"] == f"outputs/qwen2_7b/${{split}}/{method}/seed${{seed}}"
        gaussian = method == "abmll"
        assert cfg.model._component_ == (
            "abmll.models.gaussian_lora_qwen2_7b" if gaussian else "torchtune.models.qwen2.lora_qwen2_7b")
        # Key for key what the llama3_8b config says, but for the files, the names and the model.
        llama = _load("llama3_8b", method)
        ours, theirs = raw, OmegaConf.to_container(llama, resolve=False)
        assert sorted(ours) == sorted(theirs), method
        for key in sorted(set(ours) - {"output_dir", "base_model_name_or_path", "tokenizer", "checkpointer"}):
            if key == "model":
                ours[key].pop("_component_"), theirs[key].pop("_component_")
            assert ours[key] == theirs[key], (method, key)


def test_offline_default_data_dir_follows_abmll_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ABMLL_CACHE", str(tmp_path))
    cfg = _load("smollm2_135m", "abmll")
    assert cfg.data.data_dir == f"{tmp_path}/bigbench-mc"


def test_abmll_ls_and_cp_use_the_recipe_registry(tmp_path, capsys):
    """`abmll ls` lists what --config accepts; `abmll cp` copies a packaged config, refuses to
    overwrite, and the copy runs through the recipe's resolution as a path."""
    from abmll.config_registry import main, packaged_configs, resolve_config

    names = packaged_configs()
    assert "llama3_8b/abmll" in names and "tiny/pretrained" in names and len(names) == 20
    assert [n for n in names if n.startswith("qwen2_7b/")] == [f"qwen2_7b/{m}" for m in sorted(METHODS)]
    assert main(["ls"]) == 0 and capsys.readouterr().out.split() == names
    dest = tmp_path / "mine.yaml"
    assert main(["cp", "llama3_8b/abmll", str(dest)]) == 0
    assert dest.read_text() == resolve_config("llama3_8b/abmll").read_text()
    dest.write_text("edited")
    assert main(["cp", "llama3_8b/abmll", str(dest)]) == 2 and dest.read_text() == "edited"
    assert main(["cp", "no/such", str(tmp_path / "x.yaml")]) == 2
    assert "tiny/abmll" in capsys.readouterr().err
    assert resolve_config(str(dest)) == dest
