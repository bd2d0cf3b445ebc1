"""Shared test set-up: offline hubs, no tiktoken cache, a helper to run `tune run`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from abmll.cache import OFFLINE_ENV  # no torch import: cheap

for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)
os.environ["TIKTOKEN_CACHE_DIR"] = ""  # whatever the user's shell says (torchtune 0.6.1 quirk)

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


def recipe_in_process(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """What `tune run abmll_recipe ARGS` does, in this process: the same argument handling
    (`--config` short names, torchtune's `config.parse`), the recipe's exit status, and its
    stdout and stderr (print, tqdm and log lines) captured. A `tune run` costs ~10 s of imports
    on a 2-core CPU before the recipe starts; most tests need the recipe, not the launcher.
    The recipe seeds every random number it draws, so a run here gives a subprocess run's
    numbers (test_recipe.py::test_the_in_process_runner_gives_tune_runs_numbers)."""
    import contextlib
    import io
    import logging

    import abmll_recipe
    from abmll.config_registry import resolve_config_arg

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
    root = logging.getLogger()
    saved_argv, saved_cwd, code = sys.argv, os.getcwd(), 0
    root.addHandler(handler)
    try:
        os.chdir(cwd or saved_cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                sys.argv = resolve_config_arg(["abmll_recipe", *args])
                abmll_recipe.recipe_main()
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        root.removeHandler(handler)
        sys.argv = saved_argv
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess(["abmll_recipe", *args], code, out.getvalue(), err.getvalue())


def shrink_builders(monkeypatch, builders_module, names, shape: dict) -> list:
    """Make a full-size model builder (``llama3_8b``, ``qwen2_7b``, ...) build at ``shape``: the
    component builders ``names`` that ``builders_module`` calls get the shape keys replaced.
    Returns the list of keyword sets each call was made with (the full-size builder's own)."""
    calls = []

    def shrink(component):
        def build(*args, **kwargs):
            assert not args, "the full-size builders pass keywords only"
            calls.append(dict(kwargs))
            return component(**{**kwargs, **shape})

        return build

    for name in names:
        monkeypatch.setattr(builders_module, name, shrink(getattr(builders_module, name)))
    return calls


@pytest.fixture
def run_recipe(tmp_path):
    """Run the recipe as `tune run` would: in this process (:func:`recipe_in_process`), or with
    ``launcher=True`` (or several processes, or another environment) through `tune run` itself."""

    def _run(*args: str, launcher: bool = False, **kw):
        cwd = kw.pop("cwd", tmp_path)
        if launcher or kw.get("nproc", 1) > 1 or kw.get("env") is not None:
            return tune_run(*args, cwd=cwd, **kw)
        kw.pop("timeout", None)
        return recipe_in_process(*args, cwd=cwd)

    return _run
