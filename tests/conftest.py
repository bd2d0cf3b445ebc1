"""Shared test set-up: offline hubs, no tiktoken cache, a helper to run `tune run`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["TIKTOKEN_CACHE_DIR"] = ""

REPO = Path(__file__).resolve().parents[1]


def tune_run(*args: str, cwd=None, timeout: int = 300, nproc: int = 1, env=None) -> subprocess.CompletedProcess:
    """Run `tune run abmll_recipe ARGS` in a subprocess, as a user would (``nproc`` > 1:
    `tune run --nproc_per_node NPROC --standalone abmll_recipe ARGS`)."""
    tune = Path(sys.executable).with_name("tune")
    launch = ["--nproc_per_node", str(nproc), "--standalone"] if nproc > 1 else []
    cmd = [str(tune), "run", *launch, "abmll_recipe", *args]
    env = dict(env if env is not None else os.environ, PYTHONHASHSEED="0")
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture
def run_recipe(tmp_path):
    def _run(*args: str, **kw):
        return tune_run(*args, cwd=kw.pop("cwd", tmp_path), **kw)

    return _run
