"""`abmll evaluate`: a finished run tested again, with unchanged keys exactly, never touching
the run's own directory; training keys refused."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from abmll.evaluate_run import EvaluateError, check_eval_overrides, evaluate_run
from test_configs import METHODS


def _tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("method", METHODS)
def test_unchanged_keys_reproduce_the_runs_test_exactly(run_recipe, tmp_path, method):
    run = tmp_path / "run"
    proc = run_recipe("--config", f"tiny/{method}", f"output_dir={run}", "epochs=2",
                      "data.max_eval_examples_per_task=6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    before = _tree_digest(run)
    res = evaluate_run(run, tmp_path / "again")
    original = json.loads((run / "results.json").read_text())
    assert res["test"] == original["test"] and res["test_ts"] == original["test_ts"]
    assert res["best_epoch"] == original["best_epoch"] and res["method"] == original["method"]
    assert res["evaluated_from"]["adapters"] == "best"
    assert json.loads((tmp_path / "again" / "results.json").read_text())["test"] == original["test"]
    assert (tmp_path / "again" / "predictions_test.parquet").exists()
    assert _tree_digest(run) == before  # the run's own directory is only read


def test_changed_eval_keys_and_final_adapters(run_recipe, tmp_path):
    run = tmp_path / "run"
    proc = run_recipe("--config", "tiny/abmll", f"output_dir={run}", "epochs=2",
                      "data.max_eval_examples_per_task=6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = evaluate_run(run, tmp_path / "curve", ["eval.num_samples=[1,3]", "data.max_eval_examples_per_task=4"])
    assert set(res["test"]["samples_curve"]) == {"1", "3"} and res["test"]["num_samples"] == 3
    assert all(r["n"] == 4 for r in res["test"]["per_task"].values())
    with pytest.raises(ValueError, match="did you mean 'eval.num_samples'"):
        evaluate_run(run, tmp_path / "typo", ["eval.num_sample=3"])
    final = evaluate_run(run, tmp_path / "final", adapters="final")
    assert final["best_epoch"] == 2 and final["evaluated_from"]["adapters"] == "final"
    # The compute dtype is a test setting: the same float32 adapters, tested in bf16.
    original = json.loads((run / "results.json").read_text())
    bf16 = evaluate_run(run, tmp_path / "bf16", ["dtype=bf16", "data.max_eval_examples_per_task=4"])
    assert original["precision"]["dtype"] == "fp32" and bf16["precision"]["dtype"] == "bf16"
    assert bf16["precision"]["requested"] == "bf16" and bf16["best_epoch"] == original["best_epoch"]


@pytest.mark.parametrize("key", ["learner.beta=1", "epochs=3", "model.c=-4", "data.batch_size=4", "seed=1"])
def test_a_training_key_is_refused_naming_it(key):
    with pytest.raises(EvaluateError, match=f"'{key.split('=')[0]}' is a training key"):
        check_eval_overrides([key])


def test_the_command_line_refuses_unfinished_runs_and_training_keys(tmp_path):
    exe = Path(sys.executable).with_name("abmll")
    (tmp_path / "run").mkdir()
    proc = subprocess.run([str(exe), "evaluate", str(tmp_path / "run"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no finished run there" in proc.stderr.strip().splitlines()[-1]
    proc = subprocess.run([str(exe), "evaluate", str(tmp_path / "run"), "--out", str(tmp_path / "o"),
                           "learner.inner_lr=1"], capture_output=True, text=True)
    assert proc.returncode == 2 and "'learner.inner_lr' is a training key" in proc.stderr
    assert not (tmp_path / "o").exists()
