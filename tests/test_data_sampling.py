import pytest
import torch
from test_data_common import ByteTokenizer

from abmll.data import (
    MCExample,
    TaskSampler,
    load_split,
    tokenize_example,
)


def _sampler(tasks, bs=2, seed=0):
    return TaskSampler(tasks, ByteTokenizer(), batch_size=bs, max_seq_len=256, seed=seed)


def _ids(batches, sampler, task):
    """Recover example indices from the collated token rows."""
    lookup = {tuple(tokenize_example(e, sampler.tokenizer, 256)["tokens"]): i for i, e in enumerate(sampler.tasks[task])}
    out = []
    for b in batches:
        for row, n in zip(b["tokens"], (b["labels"] != -100).nonzero()[:, 1] + 1):
            out.append(lookup[tuple(row[:n].tolist())])
    return out


def _tasks(n=20, n_tasks=2):
    return {
        f"task{t}": [MCExample(f"task{t}", f"q{t} number {i}", ("a", "b"), "ab"[i % 2]) for i in range(n)]
        for t in range(n_tasks)
    }


def test_tiny_split():
    s = load_split("tiny")
    assert s.name == "tiny" and len(s.train) >= 6 and len(s.val) >= 2
    assert set(s.val) == set(s.test) and not set(s.train) & set(s.val)
    tok = ByteTokenizer()
    for d in (s.train, s.val, s.test):
        for exs in d.values():
            assert len(exs) >= 20
            for e in exs:
                assert 2 <= len(e.options) <= 4 and e.output in e.options and len(e.input) < 60
                assert len(tokenize_example(e, tok, 10_000)["tokens"]) <= 256
    for t in s.val:
        key = lambda e: (e.input, e.output, e.options)
        assert not {key(e) for e in s.val[t]} & {key(e) for e in s.test[t]}
    # deterministic
    assert load_split("tiny").train == s.train


def test_split_errors():
    with pytest.raises(ValueError, match=r"`split`.*tiny"):
        load_split("no_such_split")


def test_episode_reproducible_and_epoch_dependent():
    tasks = _tasks()
    s1, s2 = _sampler(tasks), _sampler(tasks)
    sup, qry = s1.episode("task0", epoch=3, num_support=5, num_query=1)
    assert len(sup) == 5 and len(qry) == 1 and all(b["tokens"].shape[0] == 2 for b in sup + qry)
    sup2, qry2 = s2.episode("task0", epoch=3, num_support=5, num_query=1)
    for a, b in zip(sup + qry, sup2 + qry2):
        assert torch.equal(a["tokens"], b["tokens"])
    idx = _ids(sup + qry, s1, "task0")
    assert len(set(idx)) == 12  # without replacement within the episode
    sup4, qry4 = s1.episode("task0", epoch=4, num_support=5, num_query=1)
    assert _ids(sup4 + qry4, s1, "task0") != idx
    # different seed, different draw
    sup1, qry1 = _sampler(tasks, seed=1).episode("task0", 3, 5, 1)
    assert _ids(sup1 + qry1, s1, "task0") != idx


def test_episode_small_task_repeats_after_exhausting():
    tasks = _tasks(n=5)
    s = _sampler(tasks)
    sup, qry = s.episode("task0", 0, num_support=5, num_query=1)
    idx = _ids(sup + qry, s, "task0")
    assert len(idx) == 12 and set(idx[:5]) == set(range(5))


def test_pooled_batches_mix_tasks():
    tasks = _tasks(n=10, n_tasks=3)
    s = _sampler(tasks)
    bs = s.pooled_batches(epoch=0, num_batches=6)
    assert len(bs) == 6
    seen = set()
    for b in bs:
        for row in b["tokens"]:
            seen.add(bytes(t for t in row.tolist() if t < 256).decode().split("Question: q")[1][0])
    assert len(seen) >= 2
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(bs, _sampler(tasks).pooled_batches(0, 6)))
    assert not all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(bs, s.pooled_batches(1, 6)))


def test_adaptation_split_disjoint_and_deterministic():
    tasks = _tasks(n=30)
    s = _sampler(tasks)
    sup, ev = s.adaptation_split("task0", num_support=5, max_eval_examples=None)
    si, ei = _ids(sup, s, "task0"), _ids(ev, s, "task0")
    assert len(si) == 10 and len(ei) == 20 and not set(si) & set(ei)
    assert set(si) | set(ei) == set(range(30))
    sup2, ev2 = _sampler(tasks).adaptation_split("task0", 5, None)
    assert _ids(sup2, s, "task0") == si and _ids(ev2, s, "task0") == ei
    _, ev3 = s.adaptation_split("task0", 5, max_eval_examples=7)
    assert len(_ids(ev3, s, "task0")) == 7 and set(_ids(ev3, s, "task0")) <= set(ei)
    with pytest.raises(ValueError, match="task0"):
        _sampler(_tasks(n=10)).adaptation_split("task0", num_support=5, max_eval_examples=None)


def test_eval_batches_take_eval_batch_size_grouped_by_length_same_examples():
    """Evaluation batches: eval_batch_size, sorted by length; the same examples as with the
    training batch size; support batches keep the training batch size."""
    tasks = _tasks(n=40)
    small = _sampler(tasks)
    big = TaskSampler(tasks, small.tokenizer, batch_size=2, max_seq_len=256, seed=0, eval_batch_size=8)
    sup_s, ev_s = small.adaptation_split("task0", 3, 20)
    sup_b, ev_b = big.adaptation_split("task0", 3, 20)
    assert _ids(sup_s, small, "task0") == _ids(sup_b, big, "task0")
    assert [len(b["label"]) for b in ev_s] == [2] * 10
    assert [len(b["label"]) for b in ev_b] == [8, 8, 4]
    assert sorted(_ids(ev_s, small, "task0")) == sorted(_ids(ev_b, big, "task0"))
    lengths = [int(p) + 1 for b in ev_b for p in b["answer_pos"]]  # the answer is the last token
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]
    with pytest.raises(ValueError, match="eval_batch_size"):
        TaskSampler(tasks, small.tokenizer, batch_size=2, max_seq_len=64, seed=0, eval_batch_size=0)
