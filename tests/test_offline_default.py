"""scripts/offline_default.py on the tiny configs: both runs, both results, the table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from abmll.cache import OFFLINE_ENV

pytestmark = pytest.mark.slow  # the offline default script end to end: not in the quick tier

REPO = Path(__file__).resolve().parents[1]


def test_offline_default_on_tiny_configs_writes_both_runs_and_prints_the_table(tmp_path):
    out = tmp_path / "default"
    env = dict(os.environ, **OFFLINE_ENV)
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "offline_default.py"), "--out", str(out),
         "--config-prefix", "tiny", "data.max_eval_examples_per_task=4"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The tiny configs bring their own tasks: no BIG-bench build is attempted.
    assert "abmll-data" not in proc.stdout and "BIG-bench" not in proc.stdout
    results = {m: json.loads((out / m / "results.json").read_text()) for m in ("pretrained", "abmll")}
    for method, res in results.items():
        assert res["finished"] and res["split"] == "tiny"
        # The script's overrides reached the runs, after the config's own values.
        assert res["config"]["epochs"] == 1 and res["config"]["eval"]["validate"] is False
        assert res["config"]["data"]["max_eval_examples_per_task"] == 4
    assert "Unseen-task test metrics (tiny random model, split tiny" in proc.stdout
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    for res in results.values():
        acc = 100 * res["test"]["mean"]["accuracy"]
        assert f"{acc:7.1f}%" in rows[res["method"]]
    tasks = list(results["abmll"]["test"]["per_task"])
    assert len(tasks) == 3 and all(task in rows for task in tasks)


def test_offline_default_tiny_refuses_a_data_dir(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "offline_default.py"), "--config-prefix", "tiny",
         "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "--data-dir" in proc.stderr
    assert not (tmp_path / "o").exists()
