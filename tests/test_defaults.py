"""Each learner/module default is spelled once: the builders and the reporting read it."""

import inspect
import json

import pytest

import abmll.learners.abmll as abmll_learner
import abmll.models as models
from abmll.learners import ABMLL
from abmll.modules import DEFAULT_C, GaussianLoRALinear
from abmll.reporting import load_results

from test_reporting import fake_run


def _default(fn, name):
    return inspect.signature(fn).parameters[name].default


def test_every_gaussian_builder_defaults_to_the_layers_c():
    assert _default(GaussianLoRALinear.__init__, "c") == DEFAULT_C == -20.0
    builders = [getattr(models, n) for n in dir(models) if n.startswith("gaussian_lora_")]
    builders.append(models.add_gaussian_lora)
    assert len(builders) >= 4
    for fn in builders:
        assert _default(fn, "c") == DEFAULT_C, fn.__name__


def test_a_run_without_learner_beta_gets_the_learners_default(tmp_path, monkeypatch):
    assert _default(ABMLL.__init__, "beta") == abmll_learner.DEFAULT_BETA == 1e-8
    out = fake_run(tmp_path, "cls45", "ABMLL", 0, 0.5, 0.1)
    path = out / "results.json"
    data = json.loads(path.read_text())
    del data["config"]["learner"]["beta"]
    path.write_text(json.dumps(data))
    # A changed default must reach the reporting: it reads the constant, not a copy of it.
    monkeypatch.setattr(abmll_learner, "DEFAULT_BETA", 1e-7)
    (run,) = load_results(tmp_path).runs
    assert run.beta == pytest.approx(1e-7)
