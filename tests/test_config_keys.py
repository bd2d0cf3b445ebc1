"""A typo'd config key is refused in one line naming the closest known key, in every section."""

import pytest
from omegaconf import OmegaConf

from abmll.config_keys import RECIPE_KEYS, check_config_keys
from abmll.config_registry import resolve_config


@pytest.mark.parametrize(
    "override,named,suggested",
    [
        ("epoch=3", "'epoch'", "'epochs'"),
        ("data.max_eval_example_per_task=100", "'data.max_eval_example_per_task'", "'data.max_eval_examples_per_task'"),
        ("eval.num_sample=10", "'eval.num_sample'", "'eval.num_samples'"),
        ("model.lora_rnk=4", "'model.lora_rank'", "'model.lora_rank'"),
        ("learner.betta=1e-5", "'learner.betta'", "'learner.beta'"),
        ("tokenizer.max_seq_length=64", "'tokenizer.max_seq_length'", "'tokenizer.max_seq_len'"),
    ],
)
def test_a_typo_in_each_section_is_refused_with_the_closest_key(run_recipe, tmp_path, override, named, suggested):
    out = tmp_path / "run"
    proc = run_recipe("--config", "tiny/abmll", f"output_dir={out}", override, launcher=override == "epoch=3")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("abmll_recipe: error: config key ") and f"did you mean {suggested}" in last
    assert override.split("=")[0] in last
    assert not out.exists()  # refused before anything was written


def test_every_packaged_config_passes_the_check():
    from abmll.config_registry import packaged_configs

    for name in packaged_configs():
        check_config_keys(OmegaConf.load(resolve_config(name)))


def test_the_check_knows_every_key_the_recipe_reads():
    """The recipe's own reads (cfg.get / cfg.<key>; data.get / data.<key> in the set-up; ev.get)
    are all in RECIPE_KEYS: a key added to the recipe but not to the check would be refused."""
    import inspect
    import re

    import abmll_recipe

    src = inspect.getsource(abmll_recipe)
    setup = "".join(inspect.getsource(f) for f in (abmll_recipe.ABMLLRecipe.setup,
                                                   abmll_recipe.ABMLLRecipe._setup_tokenizer))
    top = set(re.findall(r"\bcfg\.get\(\"([a-z_]+)\"", src)) | set(re.findall(r"\bcfg\.([a-z_]+)\b", src))
    data = set(re.findall(r"\bdata\.get\(\"([a-z_]+)\"", setup)) | set(re.findall(r"\bdata\.([a-z_]+)\b", setup))
    ev = set(re.findall(r"\bev\.get\(\"([a-z_]+)\"", src))
    assert top - {"get"} <= RECIPE_KEYS[""], top - RECIPE_KEYS[""]
    assert data - {"get"} <= RECIPE_KEYS["data"], data - RECIPE_KEYS["data"]
    assert ev and ev <= RECIPE_KEYS["eval"], ev - RECIPE_KEYS["eval"]
    assert {"max_steps_per_epoch", "dtype", "epochs"} <= top and {"max_seq_len", "k"} <= data


def test_a_section_that_is_not_a_mapping_is_refused():
    with pytest.raises(ValueError, match="'eval' must be a mapping"):
        check_config_keys(OmegaConf.create({"eval": 3}))
