"""`tune run abmll_recipe` end to end on the tiny configs, as a user runs it."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

METHODS = ["abmll", "reptile", "structured_lora", "regular_lora", "pretrained"]


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _results(out: Path):
    return json.loads((out / "results.json").read_text())


def _numbers(res):
    """Everything in a results.json that must repeat exactly (wall-clock speed need not)."""
    wall_clock = ("tokens_per_second", "seconds")
    history = [
        {**h, "train": {k: v for k, v in h.get("train", {}).items() if k not in wall_clock}}
        for h in res["history"]
    ]
    return {"test": res["test"], "history": history, "best_epoch": res["best_epoch"]}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_runs_end_to_end(run_recipe, tmp_path, method):
    out = tmp_path / method
    _ok(run_recipe("--config", f"tiny/{method}", f"output_dir={out}", "epochs=1"))
    res = _results(out)
    assert res["finished"] and res["split"] == "tiny" and res["seed"] == 0
    from abmll.data import load_split, task_lists_sha256

    assert res["split_file"] is None and res["task_lists_sha256"] == task_lists_sha256(load_split("tiny"))
    mean = res["test"]["mean"]
    assert set(mean) >= {"accuracy", "ece", "nll", "brier"}
    assert 0.0 <= mean["accuracy"] <= 1.0 and 0.0 <= mean["ece"] <= 1.0
    assert len(res["test"]["per_task"]) == 3
    assert res["best_epoch"] == (0 if method == "pretrained" else 1)
    assert res["history"][-1]["val"]["accuracy"] == res["val_at_best"]["accuracy"]
    logs = list((out / "logs").glob("log_*.txt"))
    assert logs and "val/accuracy" in logs[0].read_text()
    if method != "pretrained":
        assert "train/inner_nll" in logs[0].read_text()
        cfg = json.loads((out / "adapter_best" / "adapter_config.json").read_text())
        assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["peft_type"] == "LORA"
        assert sorted(cfg["target_modules"]) == ["o_proj", "q_proj", "v_proj"]
        weights = load_file(out / "adapter_final" / "adapter_model.safetensors")
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        assert weights[key].shape == (8, 64)
        assert len(weights) == 2 * 3 * 2  # 2 layers x 3 projections x (A, B)


def test_abmll_logs_every_objective_term(run_recipe, tmp_path):
    out = tmp_path / "a"
    _ok(run_recipe("--config", "tiny/abmll", f"output_dir={out}", "epochs=1"))
    text = next((out / "logs").glob("log_*.txt")).read_text()
    for key in ("train/inner_nll", "train/inner_kl", "train/query_nll", "train/outer_kl",
                "train/neg_log_prior", "train/lr_inner", "train/tokens_per_second", "val/ece"):
        assert key in text, key


def test_same_seed_same_numbers_and_resume_matches_uninterrupted(run_recipe, tmp_path):
    full, again, stopped = tmp_path / "full", tmp_path / "again", tmp_path / "stopped"
    args = ["--config", "tiny/abmll", "epochs=3"]
    _ok(run_recipe(*args, f"output_dir={full}"))
    _ok(run_recipe(*args, f"output_dir={again}"))
    _ok(run_recipe(*args, f"output_dir={stopped}", "stop_after_epoch=1"))
    assert not (stopped / "results.json").exists()
    assert (stopped / "checkpoints" / "recipe_state.pt").exists()
    _ok(run_recipe(*args, f"output_dir={stopped}", "resume_from_checkpoint=True"))

    a, b, c = (_numbers(_results(d)) for d in (full, again, stopped))
    assert a == b
    assert c == a


@pytest.mark.parametrize("method", ["regular_lora", "structured_lora"])
def test_baseline_resume_matches_uninterrupted(run_recipe, tmp_path, method):
    # These learners keep one AdamW across epochs (moments and step count): a resume that lost
    # or re-created the optimizer state would take a different second epoch.
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    args = ["--config", f"tiny/{method}", "epochs=2", "data.max_eval_examples_per_task=8"]
    _ok(run_recipe(*args, f"output_dir={full}"))
    _ok(run_recipe(*args, f"output_dir={stopped}", "stop_after_epoch=1"))
    assert not (stopped / "results.json").exists()
    _ok(run_recipe(*args, f"output_dir={stopped}", "resume_from_checkpoint=True"))
    assert _numbers(_results(stopped)) == _numbers(_results(full))


def test_a_finished_run_is_not_overwritten(run_recipe, tmp_path):
    out = tmp_path / "run"
    _ok(run_recipe("--config", "tiny/pretrained", f"output_dir={out}"))
    before = (out / "results.json").read_text()
    proc = run_recipe("--config", "tiny/pretrained", f"output_dir={out}", "seed=5")
    assert proc.returncode == 2
    assert "already holds a run" in proc.stderr and "overwrite=True" in proc.stderr
    assert (out / "results.json").read_text() == before


def test_resume_refuses_a_changed_config(run_recipe, tmp_path):
    out = tmp_path / "run"
    _ok(run_recipe("--config", "tiny/abmll", f"output_dir={out}", "epochs=2", "stop_after_epoch=1"))
    proc = run_recipe("--config", "tiny/abmll", f"output_dir={out}", "epochs=2",
                      "resume_from_checkpoint=True", "learner.beta=0.5")
    assert proc.returncode == 2 and "'learner'" in proc.stderr


def test_a_config_file_path_and_a_short_name_both_work(run_recipe, tmp_path):
    from importlib.resources import files

    mine = tmp_path / "my_edited_copy.yaml"
    text = files("abmll.configs").joinpath("tiny/pretrained.yaml").read_text()
    mine.write_text(text.replace("max_eval_examples_per_task: 16", "max_eval_examples_per_task: 4"))
    _ok(run_recipe("--config", "./my_edited_copy.yaml", "output_dir=out"))
    res = _results(tmp_path / "out")
    assert all(m["n"] == 4 for m in res["test"]["per_task"].values())


@pytest.mark.parametrize(
    "override,needle",
    [
        ("learner._component_=abmll.learners.NoSuchMethod", "learner._component_"),
        ("split=no_such_split", "split"),
        ("learner.beta=-1", "learner.beta"),
        ("split=cls45", "data.data_dir"),
        ("data.data_dir=/no/such/dir", "/no/such/dir"),
        ("checkpointer._component_=torchtune.training.FullModelMetaCheckpointer", "checkpointer.checkpoint_dir"),
        ("model._component_=abmll.models.no_such_model", "model._component_"),
        ("eval.num_samples=0", "eval.num_samples"),
    ],
)
def test_bad_config_gives_one_clear_error(run_recipe, tmp_path, override, needle):
    out = tmp_path / "bad"
    extra = ["checkpointer.checkpoint_dir=/no/such/ckpt"] if override.startswith("checkpointer") else []
    # One case through `tune run` itself: the launcher's exit status and stderr are the same.
    proc = run_recipe("--config", "tiny/abmll", f"output_dir={out}", override, *extra,
                      launcher=override.startswith("learner.beta"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("abmll_recipe: error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # nothing written


def test_unknown_config_name_lists_the_packaged_ones(run_recipe):
    proc = run_recipe("--config", "tiny/nope", launcher=True)  # the recipe's own __main__
    assert proc.returncode == 2 and "tiny/abmll" in proc.stderr


def test_without_validation_the_last_epoch_is_tested(run_recipe, tmp_path):
    out = tmp_path / "noval"
    _ok(run_recipe("--config", "tiny/reptile", f"output_dir={out}", "epochs=2", "eval.validate=false"))
    res = _results(out)
    assert res["best_epoch"] == 2 and res["val_at_best"] is None
    assert all("val" not in h for h in res["history"])
    assert 0.0 <= res["test"]["mean"]["accuracy"] <= 1.0


def _clean_adapter_names(path: Path):
    import torch

    state = torch.load(path / "checkpoints" / "recipe_state.pt", map_location="cpu", weights_only=False)
    return [k for k in list(state["adapters"]) + list(state["best"]["adapters"]) if "_checkpoint" in k]


def _flat(tree, prefix=""):
    if tree is None:  # an absent optional block (e.g. test.samples_curve): must be absent on both sides
        return {prefix: float("nan")}
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}.{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix}[{i}]").items()}
    return {prefix: tree}


def test_resume_with_activation_checkpointing_switched_either_way_matches(run_recipe, tmp_path):
    # Checkpointing the activations recomputes the forward with the same RNG state, and adapter
    # names do not carry the wrapper's prefix: a run may switch it on resume. The backward
    # through recomputed activations rounds differently, so the numbers match to rounding.
    args = ["--config", "tiny/abmll", "epochs=2", "data.max_eval_examples_per_task=8"]
    full = tmp_path / "full"
    _ok(run_recipe(*args, f"output_dir={full}"))
    expected = _flat(_numbers(_results(full)))
    for first, then in (("True", "False"), ("False", "True")):
        out = tmp_path / f"ac{first}_then{then}"
        _ok(run_recipe(*args, f"output_dir={out}", "stop_after_epoch=1",
                       f"enable_activation_checkpointing={first}"))
        assert _clean_adapter_names(out) == []
        _ok(run_recipe(*args, f"output_dir={out}", "resume_from_checkpoint=True",
                       f"enable_activation_checkpointing={then}"))
        got = _flat(_numbers(_results(out)))
        assert got.keys() == expected.keys()
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-7, nan_ok=True), (first, then)
        assert _results(out)["config"]["enable_activation_checkpointing"] is (then == "True")
        assert (out / "adapter_best" / "adapter_model.safetensors").exists()


def test_a_failed_export_keeps_the_results_and_exits_non_zero(run_recipe, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter_best").write_text("a file where the adapter directory should go")
    args = ["--config", "tiny/regular_lora", f"output_dir={out}", "epochs=1"]
    proc = run_recipe(*args)
    assert proc.returncode == 1, proc.stderr[-3000:]
    res = _results(out)
    assert res["finished"] and 0.0 <= res["test"]["mean"]["accuracy"] <= 1.0
    assert set(res["errors"]) == {"export"} and "adapter_best" in res["errors"]["export"]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("abmll_recipe: error:")]
    assert len(errors) == 1 and "export" in errors[0], proc.stderr[-3000:]

    # Resuming redoes the end of the run (same test numbers) and now exports.
    (out / "adapter_best").unlink()
    _ok(run_recipe(*args, "resume_from_checkpoint=True"))
    again = _results(out)
    assert again["errors"] == {} and again["test"] == res["test"]
    assert (out / "adapter_best" / "adapter_model.safetensors").exists()
    # A run that finished without errors has nothing left to do on resume.
    proc = _ok(run_recipe(*args, "resume_from_checkpoint=True"))
    assert "nothing to do" in proc.stderr + proc.stdout


def test_a_failed_pruning_fraction_keeps_the_earlier_ones_and_still_exports(tmp_path, monkeypatch):
    from importlib.resources import files

    import abmll_recipe
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(str(files("abmll.configs").joinpath("tiny/reptile.yaml")))
    cfg.merge_with({"output_dir": str(tmp_path / "run"), "epochs": 1,
                    "eval": {"prune_fractions": [0.1, 0.5]}, "data": {"max_eval_examples_per_task": 4}})
    real = abmll_recipe.prune_hidden_units

    def prune(model, fraction):
        if fraction == 0.5:
            raise RuntimeError("pruning broke at 0.5")
        return real(model, fraction)

    monkeypatch.setattr(abmll_recipe, "prune_hidden_units", prune)
    recipe = abmll_recipe.ABMLLRecipe(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.finish()
    recipe.cleanup()
    res = _results(tmp_path / "run")
    assert list(res["pruning"]) == ["0.1"] and "accuracy" in res["pruning"]["0.1"]
    assert res["errors"] == {"pruning": "RuntimeError: pruning broke at 0.5"}
    assert recipe.errors == res["errors"]
    assert (tmp_path / "run" / "adapter_final" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("builder,learner", [("gaussian_lora_tiny_llama", "ABMLL"), ("lora_tiny_llama", "Reptile")])
def test_adapter_names_and_trainable_params_do_not_depend_on_activation_checkpointing(builder, learner):
    import torch
    from torchtune import modules, training

    import abmll.learners
    import abmll.models

    def setup(checkpointing: bool):
        torch.manual_seed(0)
        model = getattr(abmll.models, builder)()
        if checkpointing:
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        ln = getattr(abmll.learners, learner)()
        ln.setup(model, torch.device("cpu"))
        trainable = sorted(n.replace("_checkpoint_wrapped_module.", "")
                           for n, p in model.named_parameters() if p.requires_grad)
        return ln, trainable

    plain, plain_trainable = setup(False)
    wrapped, wrapped_trainable = setup(True)
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.model.named_modules())
    assert list(wrapped.adapter_params) == list(plain.adapter_params)
    assert wrapped_trainable == plain_trainable and len(plain_trainable) > 0
    assert set(wrapped.export_adapter()) == set(plain.export_adapter())
    assert not [k for k in wrapped.export_adapter() if "_checkpoint" in k]


def test_a_non_finite_loss_stops_the_run_naming_step_task_and_term(run_recipe, tmp_path):
    """A learning rate that blows the adapters up: the run stops at the first non-finite term
    with one line naming the step, task and term, exit status 1, and no results written."""
    out = tmp_path / "nan"
    proc = run_recipe("--config", "tiny/abmll", f"output_dir={out}", "epochs=1", "learner.inner_lr=1e30")
    assert proc.returncode == 1, proc.stderr[-2000:]
    [line] = [l for l in proc.stderr.splitlines() if l.startswith("abmll_recipe: error:")]
    assert "non-finite" in line and "at step 1 (epoch 1, task '" in line and "inner_nll=nan" in line
    assert "no checkpoint was written yet" in line
    assert not (out / "results.json").exists()


def test_the_in_process_runner_gives_tune_runs_numbers(run_recipe, tmp_path):
    """The suite runs the recipe in its own process (conftest.recipe_in_process); the same
    config through `tune run` must give the same test metrics and adapters to the bit."""
    args = ("--config", "tiny/abmll", "epochs=1", "data.max_eval_examples_per_task=4")
    _ok(run_recipe(*args, f"output_dir={tmp_path / 'here'}"))
    _ok(run_recipe(*args, f"output_dir={tmp_path / 'tune'}", launcher=True))
    here, tune = _results(tmp_path / "here"), _results(tmp_path / "tune")
    assert here["test"] == tune["test"] and here["history"][0]["train"].keys() == tune["history"][0]["train"].keys()
    a = load_file(tmp_path / "here" / "adapter_final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "tune" / "adapter_final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
