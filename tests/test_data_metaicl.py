import json
import logging
from pathlib import Path

import pytest
import yaml

from abmll.data import known_splits, load_split
from abmll.data.metaicl import format_report, read_split_def, read_task_file

SPLITS = Path(__file__).resolve().parents[1] / "abmll" / "data" / "splits"


def rec(task, i, n_opts=2, correct=0):
    opts = [f"opt{j}" for j in range(n_opts)]
    return {"task": task, "input": f"{task} question {i}", "output": opts[correct] if opts else "x", "options": opts}


def write(path: Path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for l in lines:
            f.write((l if isinstance(l, str) else json.dumps(l)) + "\n")
    return path


def make_dir(root: Path, train=("t1", "t2"), unseen=("u1",), n=12):
    for t in train:
        write(root / t / f"{t}_16384_100_train.jsonl", [rec(t, i, 2 + i % 3, i % 2) for i in range(n)])
    for t in unseen:
        write(root / t / f"{t}_16_100_dev.jsonl", [rec(t, i) for i in range(n)])
        write(root / t / f"{t}_16_100_test.jsonl", [rec(t, 100 + i, 3) for i in range(n + 1)])
    return root


def split_file(tmp_path, train=("t1", "t2"), test=("u1",), **extra):
    p = tmp_path / "mysplit.yaml"
    p.write_text(yaml.safe_dump({"train": list(train), "test": list(test), **extra}))
    return str(p)


def test_load_from_dir(tmp_path):
    d = make_dir(tmp_path / "data")
    s = load_split("mine", str(d), split_file=split_file(tmp_path))
    assert s.name == "mine" and set(s.train) == {"t1", "t2"} and set(s.val) == set(s.test) == {"u1"}
    assert len(s.train["t1"]) == 12 and len(s.val["u1"]) == 12 and len(s.test["u1"]) == 13
    assert s.test["u1"][0].input == "u1 question 100" and s.val["u1"][0].input == "u1 question 0"
    ex = s.train["t1"][1]
    assert ex.task == "t1" and ex.options == ("opt0", "opt1", "opt2") and ex.label == 1
    assert {(r.task, r.part) for r in s.report} == {("t1", "train"), ("t2", "train"), ("u1", "val"), ("u1", "test")}
    assert "t1" in format_report(s.report)


def test_k_seed_overrides(tmp_path):
    d = tmp_path / "data"
    write(d / "t1" / "t1_16_13_train.jsonl", [rec("t1", i) for i in range(3)])
    write(d / "u1" / "u1_16_13_dev.jsonl", [rec("u1", i) for i in range(3)])
    write(d / "u1" / "u1_16_13_test.jsonl", [rec("u1", i) for i in range(3)])
    sf = split_file(tmp_path, train=("t1",))
    for k, seed in ((16, 13), ("16", "train:13,val:13,test:13"), ({"train": 16, "dev": 16, "test": 16}, 13)):
        s = load_split("mine", str(d), split_file=sf, k=k, seed=seed)
        assert len(s.train["t1"]) == 3
    # split-file `files:` key
    sf2 = split_file(tmp_path, train=("t1",), files={p: {"k": 16, "seed": 13} for p in ("train", "val", "test")})
    assert len(load_split("mine", str(d), split_file=sf2).test["u1"]) == 3
    with pytest.raises(ValueError, match="data.k"):
        load_split("mine", str(d), split_file=sf, k="train:16,bogus:3")


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"task": "t1", "input": "q", ', r"t1_16384_100_train.jsonl:3: malformed JSON"),
        (json.dumps({"task": "t1", "input": "q", "options": ["a", "b"]}), r":3: missing field\(s\) \['output'\]"),
        (json.dumps({"task": "t1", "input": "q", "output": "c", "options": ["a", "b"]}), r":3: output 'c' is not among options"),
        (json.dumps({"task": "t1", "input": "q", "output": "a", "options": "a|b"}), r":3: 'options' must be a list"),
        ("[1, 2]", r":3: expected a JSON object"),
    ],
)
def test_validation_errors_name_file_and_line(tmp_path, line, match):
    d = make_dir(tmp_path / "data")
    write(d / "t1" / "t1_16384_100_train.jsonl", [rec("t1", 0), rec("t1", 1), line, rec("t1", 3)])
    with pytest.raises(ValueError, match=match):
        load_split("mine", str(d), split_file=split_file(tmp_path))


def test_empty_task_file(tmp_path):
    d = make_dir(tmp_path / "data")
    write(d / "u1" / "u1_16_100_test.jsonl", ["", "  "])
    with pytest.raises(ValueError, match=r"u1_16_100_test.jsonl: empty task file"):
        load_split("mine", str(d), split_file=split_file(tmp_path))


def test_option_filter_and_report(tmp_path):
    p = write(tmp_path / "t" / "t_16384_100_train.jsonl",
              [rec("t", 0, 1), rec("t", 1, 2), rec("t", 2, 3), rec("t", 3, 4), rec("t", 4, 5), rec("t", 5, 0),
               {"task": "t", "input": "q", "output": "a", "options": ["a", "a", "b"]},
               {"task": "t", "input": "q", "output": "zz", "options": ["a", "b", "c", "d", "e"]}])
    exs, rep = read_task_file(p)
    assert [len(e.options) for e in exs] == [2, 3, 4]
    assert rep.kept == 3 and rep.dropped == 5 and rep.task == "t"
    assert rep.reasons == {"<2 options": 2, ">4 options": 2, "duplicate options": 1}
    assert rep.options == (2, 3, 4)


def test_train_task_with_nothing_left_is_excluded_but_unseen_is_an_error(tmp_path, caplog):
    d = make_dir(tmp_path / "data")
    write(d / "t2" / "t2_16384_100_train.jsonl", [rec("t2", i, 0) for i in range(3)])  # generative task
    with caplog.at_level(logging.WARNING):
        s = load_split("mine", str(d), split_file=split_file(tmp_path))
    assert set(s.train) == {"t1"} and "t2" in caplog.text
    assert [r.excluded for r in s.report if r.task == "t2"] == [True]
    write(d / "u1" / "u1_16_100_dev.jsonl", [rec("u1", i, 6) for i in range(3)])
    with pytest.raises(ValueError, match="u1_16_100_dev.jsonl: task 'u1' has no example"):
        load_split("mine", str(d), split_file=split_file(tmp_path))


def test_missing_tasks_listed_in_one_error(tmp_path):
    d = make_dir(tmp_path / "data")
    sf = split_file(tmp_path, train=("t1", "t2", "nope1"), test=("u1", "nope2"))
    with pytest.raises(ValueError) as e:
        load_split("mine", str(d), split_file=sf)
    msg = str(e.value)
    assert "['nope1', 'nope2']" in msg and "nope1_16384_100_train.jsonl" in msg and "nope2_16_100_test.jsonl" in msg
    # optional training tasks may be absent
    sf = split_file(tmp_path, train=("t1", "t2", "nope1"), test=("u1",), optional=["nope1"])
    assert set(load_split("mine", str(d), split_file=sf).train) == {"t1", "t2"}


def test_split_and_dir_errors(tmp_path):
    with pytest.raises(ValueError, match=r"`split`.*cls45"):
        load_split("bogus", str(tmp_path))
    with pytest.raises(ValueError, match=r"data\.data_dir"):
        load_split("cls45")
    with pytest.raises(ValueError, match=r"data\.data_dir.*not a directory"):
        load_split("cls45", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"data\.data_dir"):
        load_split("tiny", str(tmp_path))
    with pytest.raises(ValueError, match="data.split_file"):
        load_split("x", str(tmp_path), split_file=str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [a, b]\ntest: [b]\n")
    with pytest.raises(ValueError, match=r"both in `train` and in `val`/`test`: \['b'\]"):
        load_split("x", str(tmp_path), split_file=str(bad))
    bad.write_text("train: [a]\ntest: [b]\ntset: [c]\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['tset'\]"):
        load_split("x", str(tmp_path), split_file=str(bad))


def test_shipped_split_files():
    names = known_splits()
    assert {"tiny", "cls45", "cls23", "nli", "para", "mcqa", "bigbench-mc"} <= set(names)
    sizes = {}
    for n in names[1:]:
        d = read_split_def(SPLITS / f"{n}.yaml")
        assert d["train"] and d["test"]
        assert not set(d["train"]) & (set(d["test"]) | set(d["val"])), n
        sizes[n] = (len(d["train"]), len(d["val"]), len(d["test"]))
    assert sizes["cls45"] == (34, 15, 15) and sizes["cls23"] == (28, 15, 15)
    assert sizes["nli"][2] == 8 and sizes["para"][2] == 4 and sizes["mcqa"][2] == 22
    cls45 = read_split_def(SPLITS / "cls45.yaml")
    assert cls45["val"] == cls45["test"] and "sms_spam" in cls45["train"] and "yelp_polarity" in cls45["test"]
    assert read_split_def(SPLITS / "cls23.yaml")["test"] == cls45["test"]
    bb = read_split_def(SPLITS / "bigbench-mc.yaml")
    assert 0.6 <= len(bb["train"]) / (len(bb["train"]) + len(bb["test"])) <= 0.8
