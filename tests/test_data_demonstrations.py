"""In-context demonstrations (``data.num_demonstrations``): the prompt with k solved examples
of the same task before the question, which examples they are, truncation, the errors, and
that k = 0 is today's prompt to the token."""

import hashlib
import json

import pytest
from test_data_common import ASSISTANT, BOS, EOT, USER, ByteTokenizer

from abmll.data import MCExample, TaskSampler, format_prompt, load_split, tokenize_example
from abmll.data.prompt import format_with_demonstrations
from abmll.models import tiny_tokenizer

Q = MCExample("t", "Is the sky blue?", ("yes", "no", "maybe"), "no")
D1 = MCExample("t", "Is grass green?", ("yes", "no"), "yes")
D2 = MCExample("t", "Is snow black?", ("yes", "no"), "no")
HEADER = "Return the label of the correct answer for the question below.\n\n"


def _tasks(n=12, n_tasks=2):
    return {
        f"task{t}": [MCExample(f"task{t}", f"q{t} number {i}", ("a", "b"), "ab"[i % 2]) for i in range(n)]
        for t in range(n_tasks)
    }


def _sampler(tasks, k, seed=0, pool="task", max_seq_len=1024, **kw):
    return TaskSampler(tasks, ByteTokenizer(), batch_size=2, max_seq_len=max_seq_len, seed=seed,
                       num_demonstrations=k, demonstration_pool=pool, **kw)


# ----------------------------------------------------------------------------- the prompt
def test_plain_prompt_text_and_exact_tokens_tiny_tokenizer():
    tok = tiny_tokenizer()
    text = (
        HEADER + "Question: Is grass green?\n\nChoices:\nA) yes\nB) no\nAnswer: A\n\n"
        + HEADER + "Question: Is snow black?\n\nChoices:\nA) yes\nB) no\nAnswer: B\n\n"
        + HEADER + "Question: Is the sky blue?\n\nChoices:\nA) yes\nB) no\nC) maybe\nAnswer:"
    )
    assert format_with_demonstrations(Q, [D1, D2]) == text
    assert format_with_demonstrations(Q, []) == format_prompt(Q)
    out = tokenize_example(Q, tok, 1024, demonstrations=[D1, D2])
    letter_b = tok.encode(" B", add_bos=False, add_eos=False)
    assert len(letter_b) == 1
    assert out["tokens"] == tok.encode(text, add_bos=True, add_eos=False) + letter_b
    # Each demonstration is its own zero-shot prompt and answer, token for token.
    zero = [tokenize_example(e, tok, 1024)["tokens"] for e in (D1, D2, Q)]
    sep = tok.encode("\n\n", add_bos=False, add_eos=False)
    assert out["tokens"] == zero[0] + sep + zero[1][1:] + sep + zero[2][1:]
    # Only the question's letter is trained, at the end.
    assert out["answer_pos"] == len(out["tokens"]) - 1 and out["demonstrations"] == 2
    assert [i for i, l in enumerate(out["labels"]) if l != -100] == [out["answer_pos"]]
    assert out["labels"][out["answer_pos"]] == letter_b[0]


def test_chat_prompt_demonstrations_are_earlier_turns():
    tok = ByteTokenizer()
    out = tokenize_example(Q, tok, 1024, chat_template=True, demonstrations=[D1, D2])
    enc = lambda s: tok.encode(s, add_bos=False, add_eos=False)  # noqa: E731
    expected = [BOS]
    for ex, letter in ((D1, "A"), (D2, "B"), (Q, "B")):
        expected += [USER] + enc(format_prompt(ex)) + [EOT] + [ASSISTANT] + [ord(letter)] + [EOT]
    assert out["tokens"] == expected
    pos = out["answer_pos"]
    assert pos == len(expected) - 2 and out["tokens"][pos] == ord("B")  # the last assistant turn's letter
    assert [i for i, l in enumerate(out["labels"]) if l != -100] == [pos]


@pytest.mark.slow  # SmolLM2's tokenizer: ~15 s to load on 2 cores
def test_prompt_exact_tokens_smollm2_tokenizer():
    from abmll.models import smollm2_tokenizer
    from abmll.data import option_token_ids

    tok = smollm2_tokenizer()
    plain = tokenize_example(Q, tok, 2048, demonstrations=[D1, D2])
    zero = [tokenize_example(e, tok, 2048)["tokens"] for e in (D1, D2, Q)]
    nl2 = [198, 198]  # "\n\n" between " A" and "Return" (SmolLM2 adds no BOS)
    assert plain["tokens"] == zero[0] + nl2 + zero[1] + nl2 + zero[2]
    # "Return the label of the correct answer for"
    assert plain["tokens"][:8] == [14362, 260, 4368, 282, 260, 2887, 2988, 327]
    letters = option_token_ids(tok)
    assert [zero[0][-1], zero[1][-1], plain["tokens"][-1]] == [letters[0], letters[1], letters[1]] == [330, 389, 389]
    assert plain["answer_pos"] == len(plain["tokens"]) - 1 == 119

    chat = tokenize_example(Q, tok, 2048, chat_template=True, demonstrations=[D1, D2])
    zchat = [tokenize_example(e, tok, 2048, chat_template=True)["tokens"] for e in (D1, D2, Q)]
    system = zchat[0].index(1, 1)  # the system turn: up to the second <|im_start|>
    assert chat["tokens"] == zchat[0] + zchat[1][system:] + zchat[2][system:]
    assert chat["tokens"][chat["answer_pos"]] == option_token_ids(tok, True)[1] == 50
    assert chat["answer_pos"] == len(chat["tokens"]) - 3 == 167  # then <|im_end|> "\n"


def test_no_demonstrations_is_the_zero_shot_item():
    tok = ByteTokenizer()
    for chat in (False, True):
        a = tokenize_example(Q, tok, 512, chat)
        b = tokenize_example(Q, tok, 512, chat, demonstrations=())
        assert a == b and a["demonstrations"] == 0


# Fingerprints of every batch the samplers build on the tiny split with the defaults (k = 0),
# computed with the code before demonstrations existed (commit 8d1cc67): the data path is
# unchanged to the token. (plain/chat, max_seq_len) -> sha256; the short lengths cut questions.
ZERO_SHOT_FINGERPRINTS = {
    (False, 256): "049d5732659ee78ef85b862954cc1d9fedd9856887f26af0646a40cf98f09425",
    (False, 140): "1709bb11f89070e075f1242d1cafa7f3ff2565a613d9e030bd6a655b8ce1db9f",
    (True, 256): "76766327db726258567b1f8ab9c80b05478277b41eee6f15914426337b7cc96a",
    (True, 160): "5a9376fac25a8b46dbca58ed6e830e5ca7c5b3aeefc0941286fb1644880cba1d",
}
ZERO_SHOT_FINGERPRINTS_SMOLLM2 = {
    False: "4bc6f454d6a9e51076bec261a297820aa68a4dd205f385831810eabc8ed894fa",
    True: "b98a3498393f8b754ff7f2d67387db92d32d7f3b07c03f5038495572c6a31531",
}


def _fingerprint(tokenizer, chat, max_seq_len, **kw):
    split = load_split("tiny")
    h = hashlib.sha256()

    def put(batches):
        for b in batches:
            for key in ("tokens", "labels", "answer_pos", "label", "num_options", "example"):
                h.update(json.dumps(b[key].tolist()).encode())

    for part in (split.train, split.val, split.test):
        s = TaskSampler(part, tokenizer, batch_size=2, max_seq_len=max_seq_len, seed=0, chat_template=chat,
                        eval_batch_size=8, **kw)
        for task in s.task_names:
            put(s.batches(task, list(range(len(s.tasks[task])))))
            put(s.episode(task, 1, 5, 1)[0] + s.episode(task, 1, 5, 1)[1])
            sup, ev = s.adaptation_split(task, 5, 16)
            put(sup + ev)
        put(s.pooled_batches(1, 4))
    return h.hexdigest()


@pytest.mark.parametrize("chat,max_seq_len", sorted(ZERO_SHOT_FINGERPRINTS))
@pytest.mark.parametrize("pool", ["task", "support"])
def test_k0_gives_todays_batches_to_the_token(chat, max_seq_len, pool):
    kw = dict(num_demonstrations=0, demonstration_pool=pool)
    assert _fingerprint(tiny_tokenizer(), chat, max_seq_len, **kw) == ZERO_SHOT_FINGERPRINTS[(chat, max_seq_len)]


@pytest.mark.slow  # SmolLM2's tokenizer
@pytest.mark.parametrize("chat", [False, True])
def test_k0_gives_todays_batches_to_the_token_smollm2(chat):
    from abmll.models import smollm2_tokenizer

    assert _fingerprint(smollm2_tokenizer(), chat, 256) == ZERO_SHOT_FINGERPRINTS_SMOLLM2[chat]


# ----------------------------------------------------------------------------- which examples
def test_demonstrations_never_the_question_and_from_the_same_task():
    tasks = _tasks(n=6)
    s = _sampler(tasks, k=5)  # the whole pool but the example itself
    for task in tasks:
        for i in range(6):
            demos = s.demonstrations(task, i)
            assert sorted(demos) == [j for j in range(6) if j != i]
            item = s.tokenized(task, i)
            text = ByteTokenizer().decode(item["tokens"])
            assert text.count(f"Question: {tasks[task][i].input}\n") == 1  # only as the question
            assert all(f"q{task[-1]} number" in line for line in text.split("\n") if line.startswith("Question:"))


def test_a_duplicate_of_the_question_is_never_its_demonstration():
    exs = [MCExample("t", f"q{i}", ("a", "b"), "a") for i in range(5)]
    exs += [MCExample("t", "q0", ("a", "b"), "a"), MCExample("t", "q0", ("a", "b"), "b")]  # 5, 6: copies of q0
    s = _sampler({"t": exs}, k=4)
    for i in (0, 5, 6):
        assert set(s.demonstrations("t", i)) == {1, 2, 3, 4}
    with pytest.raises(ValueError, match=r"data\.num_demonstrations.*'t'.*pool has 7 examples, 3 of them"):
        _sampler({"t": exs}, k=5).demonstrations("t", 0)


def test_same_seed_same_demonstrations_other_seed_other():
    tasks = _tasks(n=40)
    a, b, c = _sampler(tasks, 3, seed=0), _sampler(tasks, 3, seed=0), _sampler(tasks, 3, seed=1)
    draws = lambda s: [s.demonstrations(t, i) for t in tasks for i in range(40)]  # noqa: E731
    assert draws(a) == draws(b)
    assert draws(a) != draws(c)
    # Keyed by (seed, task, example): the same whatever was drawn or tokenized before.
    fresh = _sampler(tasks, 3, seed=0)
    assert fresh.demonstrations("task1", 7) == a.demonstrations("task1", 7)
    assert a.tokenized("task0", 3)["tokens"] == b.tokenized("task0", 3)["tokens"]
    # Every batch kind carries them: episodes and pooled batches of one seed agree.
    sup_a, _ = a.episode("task0", 1, 2)
    sup_b, _ = b.episode("task0", 1, 2)
    assert all((x["tokens"] == y["tokens"]).all() for x, y in zip(sup_a, sup_b))
    assert all(it == 3 for it in (a.tokenized("task0", i)["demonstrations"] for i in range(40)))


def test_unseen_task_demonstrations_come_from_its_support_examples():
    tasks = _tasks(n=30, n_tasks=1)
    s = _sampler(tasks, k=3, pool="support")
    with pytest.raises(RuntimeError, match="support examples"):
        s.tokenized("task0", 0)  # no support chosen yet
    support, evaluated = s.adaptation_split("task0", num_support=2, max_eval_examples=None)
    sup_idx = [i for b in support for i in b["example"].tolist()]
    ev_idx = [i for b in evaluated for i in b["example"].tolist()]
    assert len(sup_idx) == 4 and not set(sup_idx) & set(ev_idx)
    for i in ev_idx:
        assert set(s.demonstrations("task0", i)) <= set(sup_idx)  # never an evaluated example
    for i in sup_idx:
        demos = s.demonstrations("task0", i)
        assert i not in demos and set(demos) <= set(sup_idx)
    lengths = s.prompt_lengths()["task0"]
    assert len(lengths["evaluated"]) == len(ev_idx) and set(lengths["evaluated_demonstrations"]) == {3}
    # Too few support examples for k: one error naming the key, the task and the pool size.
    with pytest.raises(ValueError, match=r"`data\.num_demonstrations`=4 .*'task0'.*support examples.*has 4 examples"):
        _sampler(tasks, k=4, pool="support").check_demonstration_pools(num_support=2)
    _sampler(tasks, k=3, pool="support").check_demonstration_pools(num_support=2)


def test_more_demonstrations_than_the_pool_is_one_clear_error():
    tasks = {"small": _tasks(n=4, n_tasks=1)["task0"]}
    with pytest.raises(ValueError) as err:
        _sampler(tasks, k=4)
    msg = str(err.value)
    assert "`data.num_demonstrations`=4" in msg and "'small'" in msg and "4 examples" in msg and "at most 3" in msg
    _sampler(tasks, k=3)  # pool size minus the asked example
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"data\.num_demonstrations.*integer"):
            _sampler(tasks, k=bad)


# ----------------------------------------------------------------------------- truncation
@pytest.mark.parametrize("chat", [False, True])
def test_truncation_drops_demonstrations_before_cutting_the_question(chat, caplog):
    tok = ByteTokenizer()
    demos = [MCExample("t", f"demonstration {i} " + "x" * 60, ("a", "b"), "a") for i in range(3)]
    q = MCExample("t", "the question " + "y" * 100, ("a", "b"), "b")
    full = tokenize_example(q, tok, 10_000, chat, demos)
    alone = tokenize_example(q, tok, 10_000, chat)
    assert full["demonstrations"] == 3
    # Room for the question and one demonstration: the first two (farthest from it) go.
    one = tokenize_example(q, tok, len(full["tokens"]) - 1, chat, demos)
    assert one["demonstrations"] == 2
    limit = len(tokenize_example(q, tok, 10_000, chat, demos[2:])["tokens"])
    one = tokenize_example(q, tok, limit, chat, demos)
    assert one["demonstrations"] == 1 and one["tokens"] == tokenize_example(q, tok, 10_000, chat, demos[2:])["tokens"]
    # Room for the question alone: every demonstration goes, the question is whole.
    zero = tokenize_example(q, tok, len(alone["tokens"]), chat, demos)
    assert zero["demonstrations"] == 0 and zero["tokens"] == alone["tokens"]
    # Less: only now is the question cut, as without demonstrations.
    cut = tokenize_example(q, tok, len(alone["tokens"]) - 20, chat, demos)
    assert cut["demonstrations"] == 0
    assert cut["tokens"] == tokenize_example(q, tok, len(alone["tokens"]) - 20, chat)["tokens"]
    assert "the question yyy" in tok.decode(cut["tokens"]) and len(cut["tokens"]) <= len(alone["tokens"]) - 20

    # The sampler logs it once per task, with how many were dropped, and counts every prompt.
    exs = demos + [q] + [MCExample("t", f"other {i} " + "z" * 100, ("a", "b"), "b") for i in range(3)]
    s = TaskSampler({"t": exs}, tok, batch_size=2, max_seq_len=limit, seed=0, chat_template=chat, num_demonstrations=3)
    with caplog.at_level("WARNING", logger="abmll.data.sampling"):
        s.batches("t", list(range(len(exs))))
    dropped = [r for r in caplog.records if "demonstrations are dropped" in r.getMessage()]
    assert len(dropped) == 1 and "task t" in dropped[0].getMessage()
    short = sum(s.tokenized("t", i)["demonstrations"] < 3 for i in range(len(exs)))
    assert s.dropped_demonstrations()["t"] == short > 1


def test_chat_tokenizer_that_cuts_to_its_own_max_seq_len_loses_demonstrations_not_the_answer():
    """torchtune's chat tokenizers truncate to their own max_seq_len (the configs set it to
    data.max_seq_len); a cut prompt has no answer at the end and counts as too long."""

    demos = [MCExample("t", "d" * 100, ("a", "b"), "a") for _ in range(3)]
    room = len(tokenize_example(Q, ByteTokenizer(), 10_000, True, demos[2:])["tokens"]) + 5

    class Cutting(ByteTokenizer):
        max_seq_len = room

        def tokenize_messages(self, messages, **kw):
            tokens, mask = super().tokenize_messages(messages, **kw)
            return tokens[: self.max_seq_len], mask[: self.max_seq_len]

    out = tokenize_example(Q, Cutting(), 10_000, True, demos)
    assert out["demonstrations"] == 1 and len(out["tokens"]) <= room
    assert out["tokens"][out["answer_pos"]] == ord("B")


# ----------------------------------------------------------------------------- reporting
def test_summarize_prompt_lengths():
    from abmll.data import summarize_prompt_lengths

    per_task = {
        "a": {"support": [10, 12], "support_demonstrations": [2, 2], "evaluated": [10, 20, 30],
              "evaluated_demonstrations": [2, 1, 2]},
        "b": {"support": [4, 4], "support_demonstrations": [2, 0], "evaluated": [40],
              "evaluated_demonstrations": [2]},
    }
    s = summarize_prompt_lengths(per_task, 2)
    assert s["evaluated_prompts"] == 4 and s["tokens_per_evaluated_prompt"] == 25.0
    assert s["support_prompts"] == 4 and s["tokens_per_support_prompt"] == 7.5
    assert s["demonstrations_per_evaluated_prompt"] == 1.75 and s["prompts_with_dropped_demonstrations"] == 2
    assert s["tokens_per_evaluated_prompt_per_task"] == {"a": 20.0, "b": 40.0}


def test_registry_rows_and_recorded_names():
    from abmll.run_contract import ABMLL_METHODS, METHOD_ORDER, canonical_method, method, recorded_method

    assert recorded_method("ABMLL", 0) == "ABMLL" and recorded_method("ABMLL", 4) == "ABMLL-ICL"
    rows = {"pretrained_icl": ("Pretrained-ICL", "Pretrained + ICL", "pretrained", "Pretrained"),
            "regular_lora_icl": ("RegularLoRA-ICL", "Regular LoRA + ICL", "regular_lora", "RegularLoRA"),
            "abmll_icl": ("ABMLL-ICL", "ABMLL + ICL", "abmll", "ABMLL")}
    for key, (name, label, config, base) in rows.items():
        m = method(key)
        assert (m.name, m.label, m.config) == (name, label, config)
        assert m.overrides == ("data.num_demonstrations=4",) and not m.in_paper
        assert recorded_method(method(base).name, 4) == name  # what such a run records
        assert canonical_method(name) == canonical_method(label) == name
    assert METHOD_ORDER == ["Pretrained", "PretrainedTTA", "Pretrained-ICL", "RegularLoRA", "RegularLoRA-ICL",
                            "StructuredLoRA", "Reptile", "ABMLL", "ABMLL-FO", "ABMLL-ICL", "ABMLL-L"]  # variants after their method
    assert "ABMLL-ICL" in ABMLL_METHODS  # grouped by beta like ABMLL


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("method,name", [("pretrained", "Pretrained-ICL"), ("abmll", "ABMLL-ICL")])
def test_recipe_with_demonstrations_records_the_icl_method(run_recipe, tmp_path, method, name):
    out = tmp_path / method
    proc = run_recipe("--config", f"tiny/{method}", f"output_dir={out}", "epochs=1", "max_steps_per_epoch=1",
                      "eval.validate=false", "data.num_demonstrations=2", "data.max_seq_len=512",
                      "data.max_eval_examples_per_task=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == name and res["config"]["data"]["num_demonstrations"] == 2
    prompts = res["data"]["test_prompts"]
    assert res["data"]["num_demonstrations"] == 2 and prompts["demonstrations_per_evaluated_prompt"] == 2.0
    n_tasks = len(res["test"]["per_task"])
    assert prompts["evaluated_prompts"] == 4 * n_tasks and prompts["support_prompts"] == 10 * n_tasks
    assert 300 < prompts["tokens_per_evaluated_prompt"] <= 512  # ~3 zero-shot prompts of ~140 tokens
    assert res["data"]["test_seconds"] > 0  # the test's wall-clock time, the cost table's "test (min)"


def test_recipe_refuses_more_demonstrations_than_the_support_set(run_recipe, tmp_path):
    out = tmp_path / "run"
    proc = run_recipe("--config", "tiny/pretrained", f"output_dir={out}", "data.num_demonstrations=10",
                      "data.max_seq_len=512")
    assert proc.returncode == 2
    assert "data.num_demonstrations" in proc.stderr and "support examples" in proc.stderr
    assert not (out / "results.json").exists()
