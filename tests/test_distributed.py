"""Meta-batches on one process, and the same meta-batches over 2 processes (CPU, gloo).

Over processes the update must be the one process's, up to the order of float sums; resume
must continue a multi-process run exactly; a failing process must end the run, not hang it.
"""

import os
from pathlib import Path

import pytest
import torch

from abmll.data import TaskSampler, load_split
from abmll.distributed import Replicas, seed_of
from abmll.learners import ABMLL, Pretrained, Reptile
from abmll.models import gaussian_lora_tiny_llama, lora_tiny_llama, tiny_tokenizer
from abmll.run_contract import RunDir
from conftest import tune_run

pytestmark = pytest.mark.slow  # two-process runs (gloo) and their one-process references: not in the quick tier

TESTS = Path(__file__).resolve().parent
# Each process one thread: two processes on two cores (oversubscribed threads crawl).
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0",
           PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))


def _tune(out, *overrides, nproc=1, config="tiny/abmll", timeout=300):
    return tune_run("--config", config, f"output_dir={out}", *overrides, nproc=nproc, timeout=timeout, env=ENV)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _state(out):
    return torch.load(RunDir(out).checkpoint, weights_only=False)


def _results(out):
    data = RunDir(out).read_results()
    assert data is not None and data["finished"], out
    return data


def _assert_same_adapters(a, b, rtol=1e-5):
    for k in a:
        scale = a[k].abs().max().clamp_min(1e-12)
        assert ((a[k] - b[k]).abs().max() / scale) <= rtol, k


# ----------------------------------------------------------------------------- one process
@pytest.fixture(scope="module")
def sampler():
    return TaskSampler(load_split("tiny").train, tiny_tokenizer(), batch_size=2, max_seq_len=256, seed=0)


def _episodes(learner, sampler, n=2):
    keys = learner.episode_keys(sampler, 1, 0)[:n]
    eps = [learner.make_episode(sampler, k, 1) for k in keys]
    for k, e in zip(keys, eps):
        e.seed = seed_of(0, "train", 1, k)
    return eps


def _abmll(**kw):
    torch.manual_seed(0)
    learner = ABMLL(inner_lr=1e-2, outer_lr=1e-2, beta=1e-3, **kw)
    learner.setup(gaussian_lora_tiny_llama(), torch.device("cpu"))
    return learner


def test_abmll_meta_batch_averages_the_tasks_outer_gradients(sampler):
    """M tasks: each inner loop starts from theta, their outer gradients are averaged, one
    AdamW step. Reference: each task's gradient computed alone from theta, averaged by hand,
    and a plain AdamW step with that gradient."""
    learner = _abmll(meta_batch_size=2)
    episodes = _episodes(learner, sampler)
    theta0 = [p.detach().clone() for p in learner.theta]

    grads = []
    for e in episodes:
        ref = _abmll()
        with e.rng(ref.device):
            ref._inner_loop(e.support)
            ref._outer_gradient(e.query)
        grads.append([p.grad.clone() for p in ref.theta])
    mean = [(a + b) / 2 for a, b in zip(*grads)]
    params = [torch.nn.Parameter(t.clone()) for t in theta0]
    for p, g in zip(params, mean):
        p.grad = g
    torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0).step()

    learner.train_meta_batch(episodes, 2)
    for p, want in zip(learner.theta, params):
        torch.testing.assert_close(p.detach(), want.detach(), rtol=1e-5, atol=1e-7)
    # one task alone moves theta elsewhere: the average is not one task's step
    assert any(not torch.equal(g0, g1) for g0, g1 in zip(*grads))
    # afterwards every task pair starts from the new theta
    for layer in learner.layers:
        for src, dst in (("mu_theta", "mu_phi"), ("lv_theta", "lv_phi")):
            for s, d in zip(layer.factors(src), layer.factors(dst)):
                assert torch.equal(s, d)


def test_reptile_meta_batch_moves_theta_by_the_mean_of_the_tasks_moves(sampler):
    def make(**kw):
        torch.manual_seed(0)
        learner = Reptile(lr=1e-2, **kw)
        learner.setup(lora_tiny_llama(), torch.device("cpu"))
        return learner

    learner = make(epsilon=0.5, meta_batch_size=2)
    episodes = _episodes(learner, sampler)
    theta = {k: p.detach().clone() for k, p in learner.adapter_params.items()}
    phis = []
    for e in episodes:  # epsilon = 1: theta becomes the task's phi
        alone = make(epsilon=1.0)
        alone.train_meta_batch([e], 1)
        phis.append({k: p.detach().clone() for k, p in alone.adapter_params.items()})
    learner.train_meta_batch(episodes, 2)
    for k, p in learner.adapter_params.items():
        want = theta[k] + 0.5 * ((phis[0][k] - theta[k]) + (phis[1][k] - theta[k])) / 2
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-7)


def test_meta_batch_must_divide_over_the_processes_and_be_positive():
    with pytest.raises(ValueError, match="learner.meta_batch_size must be > 0"):
        ABMLL(meta_batch_size=0)
    # Checked before any collective: the recipe reports it as one line and exits 2.
    two = Replicas(world_size=2, rank=0)
    learner = Reptile(meta_batch_size=3)
    with pytest.raises(ValueError, match=r"learner.meta_batch_size=3 must be a multiple of the number of processes \(2\)"):
        learner.setup(lora_tiny_llama(), torch.device("cpu"), replicas=two)
    # Pretrained trains nothing: any number of processes (they split the evaluation).
    two.broadcast_ = lambda tensors: None  # no process group in this test
    Pretrained(test_time_adaptation=True).setup(lora_tiny_llama(), torch.device("cpu"), replicas=two)


# ----------------------------------------------------------------------------- two processes
@pytest.fixture(scope="module")
def abmll_runs(tmp_path_factory):
    """tiny/abmll, meta-batch 2, 2 epochs: one process; two processes; two processes stopped
    after epoch 1 and resumed with two processes."""
    root = tmp_path_factory.mktemp("dist")
    common = ("epochs=2", "learner.meta_batch_size=2")
    _ok(_tune(root / "one", *common))
    _ok(_tune(root / "two", *common, "debug_check_replicas=true", nproc=2))
    _ok(_tune(root / "resumed", *common, "stop_after_epoch=1", nproc=2))
    assert not RunDir(root / "resumed").results.exists()
    _ok(_tune(root / "resumed", *common, "resume_from_checkpoint=True", nproc=2))
    return root


def test_two_processes_give_one_process_theta_and_test_metrics(abmll_runs):
    one, two = _state(abmll_runs / "one"), _state(abmll_runs / "two")
    _assert_same_adapters(one["adapters"], two["adapters"])
    assert one["adapters"].keys() == two["adapters"].keys()
    r1, r2 = _results(abmll_runs / "one"), _results(abmll_runs / "two")
    for metric, value in r1["test"]["mean"].items():
        assert r2["test"]["mean"][metric] == pytest.approx(value, rel=1e-4), metric
    assert r1["test"]["per_task"].keys() == r2["test"]["per_task"].keys()


def test_only_process_zero_writes(abmll_runs):
    two = abmll_runs / "two"
    assert RunDir(two).adapter("best").is_dir() and RunDir(two).adapter("final").is_dir()
    assert len(list((two / "logs").iterdir())) == 1  # one metric log, not one per process


def test_resume_of_a_two_process_run_equals_the_uninterrupted_run(abmll_runs):
    _assert_same_adapters(_state(abmll_runs / "two")["adapters"], _state(abmll_runs / "resumed")["adapters"])
    a, b = _results(abmll_runs / "two"), _results(abmll_runs / "resumed")
    assert a["test"]["mean"] == pytest.approx(b["test"]["mean"], rel=1e-4)


def test_reptile_two_processes_equal_one(tmp_path):
    common = ("epochs=1", "learner.meta_batch_size=2")
    _ok(_tune(tmp_path / "one", *common, config="tiny/reptile"))
    _ok(_tune(tmp_path / "two", *common, config="tiny/reptile", nproc=2))
    _assert_same_adapters(_state(tmp_path / "one")["adapters"], _state(tmp_path / "two")["adapters"])
    assert _results(tmp_path / "one")["test"]["mean"] == pytest.approx(_results(tmp_path / "two")["test"]["mean"], rel=1e-4)


def test_a_failing_process_ends_the_run_with_its_error_not_a_hang(tmp_path):
    proc = _tune(
        tmp_path / "x", "epochs=1", "learner.meta_batch_size=2",
        "learner._component_=_rank_failure.ReptileFailingOnRank1",
        config="tiny/reptile", nproc=2, timeout=240,  # a hang fails the test with TimeoutExpired
    )
    assert proc.returncode != 0
    assert "injected failure in process 1" in proc.stderr
    assert not RunDir(tmp_path / "x").results.exists()
