"""A few ABMLL steps on the real SmolLM2-135M lower the training NLL (the method, not only
the plumbing, works on a pretrained model). Uses the cached converted checkpoint (fetched
through pip once) and the built-in tiny tasks, tokenised with SmolLM2's tokenizer."""

import pytest
import torch

from abmll.data import TaskSampler, load_split
from abmll.learners import ABMLL, Reptile
from abmll.models import (
    SmolLM2Checkpointer,
    gaussian_lora_smollm2_135m,
    lora_smollm2_135m,
    smollm2_tokenizer,
)
from abmll.modules import set_gaussian_mode

pytestmark = pytest.mark.slow  # training steps on the real SmolLM2-135M: not in the quick tier


def _nll(learner, batches):
    with torch.no_grad():
        return sum(learner.nll(b).item() for b in batches) / len(batches)


def _train_and_measure(model, learner, episodes=4):
    state = SmolLM2Checkpointer().load_checkpoint()["model"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lora" in k for k in missing)
    learner.setup(model, torch.device("cpu"))
    split = load_split("tiny")
    sampler = TaskSampler(split.train, smollm2_tokenizer(), batch_size=2, max_seq_len=128, seed=0)
    task = sampler.task_names[0]
    support, query = sampler.episode(task, 1, learner.inner_steps, 1)
    set_gaussian_mode(model, "mean")
    before = _nll(learner, support)
    set_gaussian_mode(model, "sample")
    for _ in range(episodes):  # the same task, so its NLL must fall
        episode = next(e for e in learner.episodes(sampler, 1, 0) if e.task == task)
        learner.train_episode(episode)
    set_gaussian_mode(model, "mean")
    after = _nll(learner, support)
    return before, after


def test_abmll_steps_on_smollm2_lower_the_training_nll():
    torch.manual_seed(0)
    model = gaussian_lora_smollm2_135m()
    learner = ABMLL(inner_steps=3, inner_lr=3e-4, outer_lr=3e-3, beta=1e-8)
    before, after = _train_and_measure(model, learner)
    print(f"ABMLL on SmolLM2: support NLL {before:.3f} -> {after:.3f}")
    assert after < before - 0.05, (before, after)


def test_reptile_steps_on_smollm2_lower_the_training_nll():
    torch.manual_seed(0)
    model = lora_smollm2_135m(["q_proj", "v_proj", "output_proj"])
    learner = Reptile(inner_steps=3, lr=3e-4, epsilon=0.5)
    before, after = _train_and_measure(model, learner)
    print(f"Reptile on SmolLM2: support NLL {before:.3f} -> {after:.3f}")
    assert after < before - 0.05, (before, after)
