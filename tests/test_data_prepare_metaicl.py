"""`abmll-data prepare metaicl`: the paper's task files from allenai/metaicl-data (or a local clone),
assembled atomically in MetaICL's layout. No network: a local folder in the hub's layout stands in
for the dataset, and the hub's own offline exceptions stand in for an offline machine."""

import json
import logging
from pathlib import Path

import pytest
import yaml

from abmll.data import load_split
from abmll.data import metaicl_hub as hub
from abmll.data.cli import main
from abmll.data.metaicl import PARTS, read_split_def, task_file
from abmll.data.metaicl_hub import MARKER, needed_files, prepare_metaicl

SPLITS = Path(__file__).resolve().parents[1] / "abmll" / "data" / "splits"
TRAIN, UNSEEN = ("t1", "t2", "t3"), ("u1",)
SEEDS = (100, 13, 21, 42, 87)


def rec(task, i, n_opts=2):
    opts = [f"{task} option {j}" for j in range(n_opts)]
    return {"task": task, "input": f"{task} question {i}", "output": opts[i % n_opts], "options": opts}


def write(path: Path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def make_hub_clone(root: Path, tasks=TRAIN + UNSEEN, n=6) -> Path:
    """``root/data/{task}/...`` as in the hub dataset: a 16384_100 train file, and the 16-shot
    train/dev/test files of every seed, for every task (the build must take only what it needs)."""
    for t in tasks:
        write(root / "data" / t / f"{t}_16384_100_train.jsonl", [rec(t, i, 2 + i % 3) for i in range(n)])
        for seed in SEEDS:
            for part in ("train", "dev", "test"):
                write(root / "data" / t / f"{t}_16_{seed}_{part}.jsonl", [rec(t, 100 * seed + i) for i in range(n)])
    (root / "README.md").write_text("dataset card")
    return root


@pytest.fixture
def split_file(tmp_path):
    p = tmp_path / "small.yaml"
    p.write_text(yaml.safe_dump({"train": list(TRAIN), "test": list(UNSEEN)}))
    return p


@pytest.fixture
def src(tmp_path):
    return make_hub_clone(tmp_path / "metaicl-data")


def expected_rels():
    return sorted([f"{t}/{t}_16384_100_train.jsonl" for t in TRAIN]
                  + [f"{u}/{u}_16_100_{p}.jsonl" for u in UNSEEN for p in ("dev", "test")])


def tree(d: Path):
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())


def test_local_source_end_to_end(tmp_path, src, split_file):
    out = tmp_path / "out"
    s = prepare_metaicl("small", out, source=src, split_file=split_file, progress=False)
    assert s["skipped"] is False and s["source"] == str(src / "data") and s["revision"] is None
    # only the files the loader opens: not the other seeds' files, not the 16-shot train files
    assert tree(out) == sorted(expected_rels() + ["ATTRIBUTION.md", MARKER])
    assert sorted(s["files"]) == expected_rels() and s["n_tasks"] == 4
    f = s["files"]["t1/t1_16384_100_train.jsonl"]
    assert f["bytes"] == (out / "t1/t1_16384_100_train.jsonl").stat().st_size and len(f["sha256"]) == 64
    assert json.loads((out / MARKER).read_text())["files"] == s["files"]
    assert s["license"] == "cc-by-nc-4.0" and s["kept"] == 3 * 6 + 2 * 6 and s["dropped"] == 0
    split = load_split("small", str(out), split_file=str(split_file))
    assert set(split.train) == set(TRAIN) and set(split.test) == set(UNSEEN)
    assert split.val["u1"][0].input == "u1 question 10000"  # seed 100's dev file
    assert not list(tmp_path.glob(".out.*"))


def test_source_may_be_the_data_folder_itself(tmp_path, src, split_file):
    s = prepare_metaicl("small", tmp_path / "out", source=src / "data", split_file=split_file, progress=False)
    assert sorted(s["files"]) == expected_rels()
    with pytest.raises(ValueError, match="neither a data/ folder nor any of the split's task folders"):
        prepare_metaicl("small", tmp_path / "o2", source=tmp_path / "out" / "t1", split_file=split_file)
    write(src / "t1" / "t1_16384_100_train.jsonl", [rec("t1", 0)])  # data/ and a task folder: which one?
    with pytest.raises(ValueError, match="ambiguous"):
        prepare_metaicl("small", tmp_path / "o3", source=src, split_file=split_file)
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_rerun_is_a_noop_and_rebuild_rebuilds(tmp_path, src, split_file):
    out = tmp_path / "out"
    prepare_metaicl("small", out, source=src, split_file=split_file, progress=False)
    f = out / "u1" / "u1_16_100_test.jsonl"
    mtime = f.stat().st_mtime_ns
    again = prepare_metaicl("small", out, source=src, split_file=split_file, progress=False)
    assert again["skipped"] is True and f.stat().st_mtime_ns == mtime
    write(src / "data" / "u1" / "u1_16_100_test.jsonl", [rec("u1", i) for i in range(9)])
    s = prepare_metaicl("small", out, source=src, split_file=split_file, rebuild=True, progress=False)
    assert s["skipped"] is False and len(f.read_text().splitlines()) == 9
    assert not list(tmp_path.glob(".out.*"))


def test_complete_out_of_another_request_is_refused(tmp_path, src, split_file):
    out = tmp_path / "out"
    prepare_metaicl("small", out, source=src, split_file=split_file, progress=False)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"train": ["t1"], "test": ["u1"]}))
    with pytest.raises(ValueError, match="holds a complete build of split 'small'.*--rebuild"):
        prepare_metaicl("small", out, source=src, split_file=other, progress=False)


def test_nonempty_out_without_marker_is_refused_and_untouched(tmp_path, src, split_file):
    out = tmp_path / "out"
    write(out / "t1" / "mine.jsonl", ["keep me"])
    with pytest.raises(ValueError, match="not a finished `prepare metaicl` build"):
        prepare_metaicl("small", out, source=src, split_file=split_file, progress=False)
    assert tree(out) == ["t1/mine.jsonl"] and (out / "t1" / "mine.jsonl").read_text() == "keep me\n"


def test_missing_files_are_all_named_and_nothing_is_written(tmp_path, src, split_file):
    (src / "data" / "t2" / "t2_16384_100_train.jsonl").unlink()
    (src / "data" / "u1" / "u1_16_100_dev.jsonl").unlink()
    (src / "data" / "u1" / "u1_16_100_test.jsonl").unlink()
    out = tmp_path / "out"
    with pytest.raises(ValueError) as e:
        prepare_metaicl("small", out, source=src, split_file=split_file, progress=False)
    msg = str(e.value)
    assert "3 of 5 file(s) missing" in msg
    for rel in ("t2/t2_16384_100_train.jsonl", "u1/u1_16_100_dev.jsonl", "u1/u1_16_100_test.jsonl"):
        assert str(src / "data" / rel) in msg
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_optional_training_task_absent_is_skipped(tmp_path, src):
    sf = tmp_path / "opt.yaml"
    sf.write_text(yaml.safe_dump({"train": ["t1", "t9"], "test": ["u1"], "optional": ["t9"]}))
    s = prepare_metaicl("opt", tmp_path / "out", source=src, split_file=sf, progress=False)
    assert "t9/t9_16384_100_train.jsonl" not in s["files"] and s["tasks"]["train"] == ["t1"]
    assert prepare_metaicl("opt", tmp_path / "out", source=src, split_file=sf, progress=False)["skipped"]


def test_malformed_line_is_named_and_never_becomes_complete(tmp_path, src, split_file):
    bad = src / "data" / "t3" / "t3_16384_100_train.jsonl"
    write(bad, [rec("t3", 0), rec("t3", 1), '{"task": "t3", "input": '])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"t3_16384_100_train\.jsonl:3: malformed JSON"):
        prepare_metaicl("small", out, source=src, split_file=split_file, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    # a previous complete build is left as it was by a failed --rebuild
    write(bad, [rec("t3", i) for i in range(4)])
    prepare_metaicl("small", out, source=src, split_file=split_file, progress=False)
    before = {p: (out / p).read_bytes() for p in tree(out)}
    write(bad, ['{"task": "t3", "input": "q", "output": "z", "options": ["a", "b"]}'])
    with pytest.raises(ValueError, match=r"t3_16384_100_train\.jsonl:1: output 'z' is not among options"):
        prepare_metaicl("small", out, source=src, split_file=split_file, rebuild=True, progress=False)
    assert {p: (out / p).read_bytes() for p in tree(out)} == before
    assert not list(tmp_path.glob(".out.*"))


def test_git_lfs_pointers_are_refused_by_name(tmp_path, src, split_file):
    p = src / "data" / "t1" / "t1_16384_100_train.jsonl"
    p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(ValueError, match="Git LFS pointers.*git lfs pull") as e:
        prepare_metaicl("small", tmp_path / "out", source=src, split_file=split_file, progress=False)
    assert str(p) in str(e.value)


# --- the hub path (no network: snapshot_download is faked, or the hub is offline) ----------------


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ABMLL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return tmp_path / "cache"


def fake_snapshot_download(clone: Path, calls: list):
    """Copies the files matching ``allow_patterns`` from ``clone`` into ``local_dir``, as the hub does."""
    from huggingface_hub.utils import filter_repo_objects

    def fake(repo_id, *, repo_type=None, revision=None, local_dir=None, allow_patterns=None, **kw):
        calls.append({"repo_id": repo_id, "repo_type": repo_type, "revision": revision,
                      "allow_patterns": list(allow_patterns), "local_dir": str(local_dir)})
        have = [p.relative_to(clone).as_posix() for p in clone.rglob("*") if p.is_file()]
        for rel in filter_repo_objects(have, allow_patterns=allow_patterns):
            dest = Path(local_dir) / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes((clone / rel).read_bytes())
        return str(local_dir)

    return fake


def test_hub_download_requests_only_the_needed_files(tmp_path, src, split_file, cache, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download(src, calls))
    out = tmp_path / "out"
    s = prepare_metaicl("small", out, split_file=split_file, progress=False)
    assert len(calls) == 1 and calls[0]["repo_id"] == "allenai/metaicl-data" and calls[0]["repo_type"] == "dataset"
    assert calls[0]["revision"] == hub.DEFAULT_REVISION
    assert sorted(calls[0]["allow_patterns"]) == ["data/" + r for r in expected_rels()]
    assert calls[0]["local_dir"] == str(cache / "metaicl-data" / hub.DEFAULT_REVISION)
    assert tree(out) == sorted(expected_rels() + ["ATTRIBUTION.md", MARKER])
    assert s["source"] == "allenai/metaicl-data" and s["revision"] == hub.DEFAULT_REVISION
    # a second build from the complete download cache does not ask the hub (works offline)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    s2 = prepare_metaicl("small", tmp_path / "out2", split_file=split_file, progress=False)
    assert len(calls) == 1 and s2["files"] == s["files"]


def test_hub_file_absent_is_named(tmp_path, src, split_file, cache, monkeypatch):
    import huggingface_hub

    (src / "data" / "t2" / "t2_16384_100_train.jsonl").unlink()
    (src / "data" / "u1" / "u1_16_100_test.jsonl").unlink()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download(src, []))
    with pytest.raises(ValueError, match="2 of 5 file.*allenai/metaicl-data at revision") as e:
        prepare_metaicl("small", tmp_path / "out", split_file=split_file, progress=False)
    assert "t2_16384_100_train.jsonl" in str(e.value) and "u1_16_100_test.jsonl" in str(e.value)
    assert not (tmp_path / "out").exists()


def _offline_errors():
    """What the installed huggingface_hub raises offline: (exception, the name the line gives)."""
    import httpx2
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError, OfflineModeIsEnabled

    wrapped = LocalEntryNotFoundError("Got: ConnectError: ...\nAn error happened while trying to locate the files")
    wrapped.__cause__ = httpx2.ConnectError("[Errno -2] Name or service not known")
    return [
        (LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder\nfor the specified revision"),
         "LocalEntryNotFoundError: Cannot find an appropriate cached snapshot folder"),
        (IncompleteSnapshotError("The cached snapshot is incomplete", snapshot_path="x"), "IncompleteSnapshotError"),
        (OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled."), "OfflineModeIsEnabled"),
        (httpx2.ConnectError("[Errno -3] Temporary failure in name resolution"), "ConnectError: [Errno -3]"),
        (wrapped, "(ConnectError: [Errno -2] Name or service not known)"),
    ]


@pytest.mark.parametrize("i", range(5))
def test_offline_hub_errors_become_one_line(tmp_path, split_file, cache, monkeypatch, capsys, i):
    import huggingface_hub

    err, named = _offline_errors()[i]

    def offline(*a, **kw):
        raise err

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    out = tmp_path / "out"
    rc = main(["prepare", "metaicl", "--split", "small", "--split-file", str(split_file), "--out", str(out),
               "--no-progress"])
    msg = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and msg.startswith("abmll-data: error: cannot download the MetaICL task files")
    assert named in msg and "huggingface.co" in msg and hub.DEFAULT_REVISION in msg
    assert "--source DIR" in msg and "git clone https://huggingface.co/datasets/allenai/metaicl-data" in msg
    assert "(5 files, e.g. data/t1/t1_16384_100_train.jsonl, data/t2/t2_16384_100_train.jsonl, ...)" in msg
    assert not out.exists()


def test_hf_hub_offline_env_with_the_real_hub_client(tmp_path, split_file, cache, monkeypatch, capsys):
    """HF_HUB_OFFLINE=1 (as tests and `abmll` runs set it): no request is made; one line says what is needed."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(["prepare", "metaicl", "--split", "cls45", "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "HF_HUB_OFFLINE is set" in err[0] and "--source DIR" in err[0] and "allenai/metaicl-data" in err[0]
    assert f"({len(needed_files('cls45'))} files, e.g. data/superglue-rte/superglue-rte_16384_100_train.jsonl" in err[0]
    # and the real snapshot_download, offline, raises what we catch (no network is touched)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    offline, _ = hub._hub_errors()
    with pytest.raises(offline):
        huggingface_hub.snapshot_download(hub.HUB_REPO, repo_type="dataset", revision=hub.DEFAULT_REVISION,
                                          local_dir=tmp_path / "dl", allow_patterns=["data/x/*"])


# --- the names requested are the names the loader opens ------------------------------------------


@pytest.mark.parametrize("split", hub.METAICL_SPLITS)
def test_requested_names_are_the_loaders(split):
    sdef = read_split_def(SPLITS / f"{split}.yaml")
    want = {task_file("", t, p, 16384 if p == "train" else 16, 100).as_posix() for p in PARTS for t in sdef[p]}
    got = needed_files(split)
    assert {f.rel for f in got} == want and len(got) == len(want)
    assert {f.hub_path for f in got} == {"data/" + r for r in want}
    assert {f.task for f in got} == set(sdef["train"]) | set(sdef["test"]) | set(sdef["val"])


def test_requested_names_match_the_files_load_split_opens(tmp_path):
    """Write exactly the requested cls45 files, then load: the loader's report paths are those
    files, with a k/seed override too (one naming rule, in metaicl.py)."""
    for k, seed in ((None, None), ("16", "train:13,val:13,test:13")):
        d = tmp_path / f"d{seed}"
        files = needed_files("cls45", k=k, seed=seed)
        for f in files:
            write(d / f.rel, [rec(f.task, i) for i in range(2)])
        split = load_split("cls45", str(d), k=k, seed=seed)
        assert sorted(r.path for r in split.report) == sorted(str(d / f.rel) for f in files)
        assert tree(d) == sorted(f.rel for f in files)


# --- the CLI -----------------------------------------------------------------------------------------


def test_cli_metaicl(tmp_path, src, split_file, capsys, caplog):
    out = tmp_path / "out"
    args = ["prepare", "metaicl", "--split", "small", "--split-file", str(split_file), "--out", str(out),
            "--source", str(src), "--no-progress"]
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    o = capsys.readouterr()
    assert "split small: 3 train tasks, 1 val, 1 test; 5 files, 30 examples kept" in o.out and "written:" in o.out
    assert "total: 30 kept, 0 dropped in 5 files" in caplog.text  # the loader's table, logged as `check` does
    assert main(args) == 0 and "nothing done" in capsys.readouterr().out
    assert main(["check", "small", "--data-dir", str(out), "--split-file", str(split_file)]) == 0


@pytest.mark.parametrize("argv, match", [
    (["prepare", "metaicl", "--out", "X"], "`prepare metaicl` needs --split"),
    (["prepare", "bigbench-mc", "--out", "X", "--split", "cls45"], "--split: not an option of `prepare bigbench-mc`"),
    (["prepare", "bigbench-mc", "--out", "X", "--source", "S", "--revision", "r"],
     "--source, --revision: not an option"),
    (["prepare", "metaicl", "--out", "X", "--split", "cls45", "--sdist", "a.tgz"],
     "--sdist: not an option of `prepare metaicl`"),
    (["prepare", "metaicl", "--out", "X", "--split", "cls45", "--source", "S", "--revision", "r"],
     "with --source nothing is downloaded"),
    (["prepare", "metaicl", "--out", "X", "--split", "bigbench-mc"], "prepare bigbench-mc --out DIR"),
    (["prepare", "metaicl", "--out", "X", "--split", "nope"], "unknown split 'nope'"),
])
def test_cli_refuses_misplaced_options(tmp_path, capsys, argv, match, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "X").exists()
