"""``model.sampling: local | weight``: a key of every Gaussian builder and config, checked, honoured
by the recipe (and so by resume, ``abmll evaluate`` and ``abmll adapt``, which build the model
from the run's config), and overridden by the benchmark's ``--sampling``."""

from importlib.resources import files

import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config

import abmll.models as M
from abmll.modules import DEFAULT_SAMPLING, gaussian_lora_modules
from abmll.modules.gaussian_lora import SAMPLINGS

FAMILIES = ["tiny", "smollm2_135m", "llama3_8b", "qwen2_7b"]
#: Every Gaussian builder; the large ones are built on the meta device.
BUILDERS = {
    "gaussian_lora_tiny_llama": False,
    "gaussian_lora_tiny_qwen2": False,
    "gaussian_lora_smollm2_135m": True,
    "gaussian_lora_llama3_8b": True,
    "gaussian_lora_llama3_1_8b": True,
    "gaussian_lora_llama3_2_1b": True,
    "gaussian_lora_llama3_2_3b": True,
    "gaussian_lora_qwen2_7b": True,
}


def _sampling_of_every_layer(model):
    layers = [m.sampling for _, m in gaussian_lora_modules(model)]
    assert layers, "no Gaussian layers"
    return set(layers)


def test_every_gaussian_builder_is_listed():
    assert set(BUILDERS) == {n for n in M.__all__ if n.startswith("gaussian_lora_")}


@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_the_key_reaches_every_layer_of_each_builder(builder):
    build = getattr(M, builder)
    with torch.device("meta" if BUILDERS[builder] else "cpu"):
        assert _sampling_of_every_layer(build()) == {DEFAULT_SAMPLING} == {"weight"}  # since note 30
        for sampling in SAMPLINGS:
            assert _sampling_of_every_layer(build(sampling=sampling)) == {sampling}


@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_a_bad_value_fails_naming_the_key_before_building(builder, monkeypatch):
    import abmll.models._gaussian as G

    monkeypatch.setattr(G, "add_gaussian_lora", lambda *a, **k: pytest.fail("built the model first"))
    with pytest.raises(ValueError, match=r"^model\.sampling must be one of local, weight, got 'exact'$"):
        getattr(M, builder)(sampling="exact")
    with pytest.raises(ValueError, match=r"model\.sampling"):
        M.add_gaussian_lora(M.tiny_llama(), sampling="Local")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_gaussian_config_says_weight_and_names_both_choices(family):
    path = files("abmll.configs").joinpath(f"{family}/abmll.yaml")
    text = path.read_text()
    cfg = OmegaConf.load(str(path))
    # The configs say the builders' default: the reporting names rows by it (run_contract.estimator_method).
    assert cfg.model.sampling == DEFAULT_SAMPLING == "weight"
    comment = text[text.index("  sampling: weight"):].split("\n\n")[0]
    for words in ("local", "weight", '"one sample from', 'the reparameterization step" reading'):
        assert words in comment, (family, words)
    cfg.model.sampling = "local"
    with torch.device("meta" if family in ("llama3_8b", "qwen2_7b", "smollm2_135m") else "cpu"):
        model = config.instantiate(cfg.model)
    assert _sampling_of_every_layer(model) == {"local"}


def test_the_recipes_instantiate_names_the_key():
    from abmll.config_registry import RecipeConfigError, instantiate

    cfg = OmegaConf.load(str(files("abmll.configs").joinpath("tiny/abmll.yaml")))
    cfg.model.sampling = "exact"
    with pytest.raises(RecipeConfigError, match=r"^model\.sampling must be one of local, weight, got 'exact'$"):
        instantiate(cfg.model, "model")


def test_the_benchmarks_sampling_overrides_the_config():
    from abmll.benchmark.runner import build, sampling_of

    assert sampling_of(build("tiny/abmll")[1]) == "weight"
    assert sampling_of(build("tiny/abmll", ["model.sampling=weight"])[1]) == "weight"
    assert sampling_of(build("tiny/abmll", ["model.sampling=weight"], sampling="local")[1]) == "local"
    assert sampling_of(build("tiny/regular_lora", sampling="weight")[1]) is None  # no Gaussian layers


def test_a_checkpoint_from_before_the_key_resumes_under_local_only():
    from abmll.run_contract import RunDirError, check_resume_config

    saved = {"seed": 0, "model": {"_component_": "abmll.models.gaussian_lora_tiny_llama", "c": -20.0}}
    check_resume_config({**saved, "model": {**saved["model"], "sampling": "local"}}, saved)
    with pytest.raises(RunDirError, match="'model' differs"):
        check_resume_config({**saved, "model": {**saved["model"], "sampling": "weight"}}, saved)
    lora = {"seed": 0, "model": {"_component_": "abmll.models.lora_tiny_llama"}}
    check_resume_config(lora, lora)


def test_fill_builder_default_writes_only_a_gaussian_models_missing_estimator():
    from abmll.config_registry import fill_builder_default

    gaussian = OmegaConf.create({"_component_": "abmll.models.gaussian_lora_tiny_llama"})
    assert fill_builder_default(gaussian, "sampling") and gaussian.sampling == DEFAULT_SAMPLING
    assert not fill_builder_default(gaussian, "sampling", "local") and gaussian.sampling == DEFAULT_SAMPLING
    old = OmegaConf.create({"_component_": "abmll.models.gaussian_lora_tiny_llama"})
    assert fill_builder_default(old, "sampling", "local") and old.sampling == "local"
    for component in ("abmll.models.lora_tiny_llama", "abmll.models.no_such_builder"):
        node = OmegaConf.create({"_component_": component})
        assert not fill_builder_default(node, "sampling") and "sampling" not in node


def _adapters(run):
    state = torch.load(run / "checkpoints" / "recipe_state.pt", map_location="cpu", weights_only=False)
    return state["adapters"]


def test_a_tiny_run_records_its_estimator_and_local_differs(run_recipe, tmp_path):
    """The key without a value (``~model.sampling``: the builders' default, ``weight`` since
    note 30) trains exactly as ``model.sampling=weight`` and records ``weight`` in its config, so
    its rows stay right if the default changes again; ``model.sampling=local`` trains with the
    other estimator, so its numbers differ. ``abmll evaluate``/``adapt`` rebuild each run's own
    estimator, and read a run recorded before the key as ``local``."""
    import json

    args = ("--config", "tiny/abmll", "epochs=1", "data.max_eval_examples_per_task=4", "model.c=-4.0")
    runs = {"default": "~model.sampling", "weight": "model.sampling=weight", "local": "model.sampling=local"}
    results, adapters = {}, {}
    for name, override in runs.items():
        out = tmp_path / name
        proc = run_recipe(*args, override, f"output_dir={out}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads((out / "results.json").read_text())
        adapters[name] = _adapters(out)
    assert results["default"]["config"]["model"]["sampling"] == "weight"  # recorded, not left out
    assert results["local"]["config"]["model"]["sampling"] == "local"
    assert results["default"]["test"] == results["weight"]["test"]
    train = {k: {m: v for m, v in r["history"][0]["train"].items() if m not in ("seconds", "tokens_per_second")}
             for k, r in results.items()}
    assert train["default"] == train["weight"]
    a, w, loc = adapters["default"], adapters["weight"], adapters["local"]
    assert a.keys() == w.keys() == loc.keys() and all(torch.equal(a[k], w[k]) for k in a)
    assert any(not torch.equal(a[k], loc[k]) for k in a)
    assert train["weight"]["inner_nll"] != train["local"]["inner_nll"]
    # A run recorded before model.sampling existed (the key removed from its results.json)
    # trained with local, the default then.
    old = tmp_path / "local" / "results.json"
    record = json.loads(old.read_text())
    del record["config"]["model"]["sampling"]
    old.write_text(json.dumps(record))
    # abmll evaluate and abmll adapt rebuild the model from the run's own config
    # (evaluate_run.read_finished_run), so the run's estimator is their adaptation steps' too.
    import abmll_recipe
    from abmll.benchmark.runner import sampling_of
    from abmll.evaluate_run import read_finished_run
    from abmll.run_contract import RunDir

    for name, want in (("default", "weight"), ("local", "local")):
        _, cfg = read_finished_run(RunDir(tmp_path / name))
        assert cfg.model.sampling == want
        cfg.output_dir = str(tmp_path / f"{name}-adapt")
        recipe = abmll_recipe.ABMLLRecipe(cfg=cfg)
        recipe.setup_for_adaptation(cfg)
        assert sampling_of(recipe.model) == want
        recipe.cleanup()
