"""A non-editable install (a wheel, as `pip install .` makes it) holds every module, the
packaged configs and the split definitions: package discovery leaves nothing out."""

import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import importlib, pkgutil, sys
import abmll, abmll_recipe
from abmll.config_registry import packaged_configs
assert abmll.__file__.startswith(sys.argv[1]), abmll.__file__
mods = sorted(m.name for m in pkgutil.walk_packages(abmll.__path__, "abmll.") if "._" not in m.name)
for m in mods:
    if not m.endswith("__main__"):
        importlib.import_module(m)
print(" ".join(mods))
print(len(packaged_configs()))
"""


@pytest.mark.slow
def test_a_non_editable_install_imports_every_module_and_finds_the_configs(tmp_path):
    # setuptools builds in the source folder (build/, *.egg-info): build from a copy.
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "results", "outputs", "*.egg-info", "__pycache__", ".pytest_cache"))
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
         "--target", str(target), str(source)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import abmll
    from abmll.config_registry import packaged_configs

    here = sorted(m.name for m in pkgutil.walk_packages(abmll.__path__, "abmll.") if "._" not in m.name)
    env = dict(os.environ, PYTHONPATH=str(target))
    proc = subprocess.run([sys.executable, "-c", PROBE, str(target)], capture_output=True, text=True,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules, n_configs = proc.stdout.strip().splitlines()
    assert modules.split() == here  # every module of the source tree is in the install
    assert int(n_configs) == len(packaged_configs()) == 20
    assert (target / "abmll" / "data" / "splits" / "bigbench-mc.yaml").is_file()
