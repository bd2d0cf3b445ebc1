"""The paper's task files (``cls45``, ``cls23``, ``nli``, ``para``, ``mcqa``) from the Hugging Face
Hub dataset ``allenai/metaicl-data``, or from a local clone of it, in MetaICL's layout.

``abmll-data prepare metaicl --split cls45 --out DIR [--source DIR] [--revision REV] [--rebuild]``:

* Files: exactly the ones the loader (:mod:`abmll.data.metaicl`) opens for the split: each
  training task's train file and each unseen task's dev and test files (default naming
  ``{task}_16384_100_train.jsonl``, ``{task}_16_100_{dev,test}.jsonl``; ``k`` / ``seed`` as in
  ``load_split``). Names come from :func:`abmll.data.metaicl.task_file`, never spelled here.
  The dataset holds them as ``data/{task}/{file}``; ``DIR`` gets ``{task}/{file}``.
* Hub: ``huggingface_hub.snapshot_download`` with ``allow_patterns`` (only those files), pinned to
  :data:`DEFAULT_REVISION` (a commit, so a rebuild gets the same bytes), into the download
  cache ``$ABMLL_CACHE/metaicl-data/{revision}`` (default ``~/.cache/abmll``). The hub writes a
  file there only once it is complete, so a stopped download resumes and finished files are not
  fetched again; when every file is already there the hub is not asked at all. The dataset's
  licence is cc-by-nc-4.0 (non-commercial); its source datasets keep their own terms.
* ``source=DIR``: a local clone (``git clone https://huggingface.co/datasets/allenai/metaicl-data``
  with Git LFS; ``DIR`` holds ``data/``, or is ``data/`` itself) or MetaICL's own preprocessing
  output (same layout); nothing is downloaded. Git LFS pointer files (a clone without
  ``git lfs pull``) are refused by name.
* Every missing file is named in one error before anything is written. Offline (no network,
  ``HF_HUB_OFFLINE=1``) the error is one line saying what is needed: network access to the hub,
  or ``--source``.
* Output, as :mod:`abmll.data.bigbench` does it: the files are copied into a hidden sibling
  (:func:`abmll.atomic.staged_dir`), validated there with ``load_split`` (the code
  ``abmll-data check`` runs), and only then, with ``.complete.json`` (split, source, revision,
  file sizes and sha256, kept/dropped counts) written last, swapped into place. A malformed file
  therefore never becomes a complete build. A complete ``DIR`` of the same request is left
  alone unless ``rebuild``; a complete ``DIR`` of another request, or a non-empty ``DIR``
  without the marker, is refused, never reused or deleted.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from abmll.atomic import clean_stale, staged_dir
from abmll.cache import cache_root, file_lock
from abmll.reporting.results import PAPER_SPLITS

from .metaicl import PARTS, file_naming, split_def, task_file

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_REVISION",
    "HUB_REPO",
    "LICENSE",
    "MARKER",
    "METAICL_SPLITS",
    "NeededFile",
    "download_cache_dir",
    "needed_files",
    "prepare_metaicl",
]

HUB_REPO = "allenai/metaicl-data"
HUB_URL = f"https://huggingface.co/datasets/{HUB_REPO}"
DEFAULT_REVISION = "9e999b5f6c4083a8c2309df57f06316a72de78ec"
LICENSE = "cc-by-nc-4.0"
MARKER = ".complete.json"  # the same marker as the BIG-bench build
KIND = "metaicl"
FORMAT_VERSION = 1
METAICL_SPLITS = PAPER_SPLITS  # the splits the dataset holds the tasks of
HUB_DATA = "data"  # the dataset's folder of task folders
_LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_COPY_CHUNK = 1 << 22


@dataclass(frozen=True)
class NeededFile:
    """One file the loader will open: ``rel`` (``{task}/{file}``, POSIX) under the task directory."""

    part: str  # train | val | test
    task: str
    rel: str

    @property
    def hub_path(self) -> str:
        return f"{HUB_DATA}/{self.rel}"


# -- which files ----------------------------------------------------------------------------------

def _split_def(split: str, split_file: str | os.PathLike | None) -> dict:
    """The split definition, as ``load_split`` resolves it; ``bigbench-mc`` is not in this dataset."""
    if split_file is None and split == "bigbench-mc":
        raise ValueError("split 'bigbench-mc' is not in the MetaICL dataset; build it with "
                         "`abmll-data prepare bigbench-mc --out DIR`")
    return split_def(split, split_file)


def needed_files(split: str, *, split_file=None, k=None, seed=None) -> list[NeededFile]:
    """The files ``load_split(split, DIR, split_file=..., k=..., seed=...)`` opens, in its order:
    training tasks' train files, then unseen tasks' dev (val) and test files."""
    sdef = _split_def(split, split_file)
    naming = file_naming(sdef, k, seed)
    out: list[NeededFile] = []
    for p in PARTS:
        for t in sdef[p]:
            rel = task_file("", t, p, naming[p]["k"], naming[p]["seed"]).as_posix()
            out.append(NeededFile(p, t, rel))
    return out


def _optional(split: str, split_file) -> set[str]:
    return set(_split_def(split, split_file)["optional"])


# -- where they come from ---------------------------------------------------------------------------

def download_cache_dir(revision: str = DEFAULT_REVISION) -> Path:
    """``$ABMLL_CACHE/metaicl-data/{revision}``: the hub's ``local_dir`` (it holds ``data/``)."""
    return cache_root() / "metaicl-data" / revision.replace("/", "--")


def _source_data_dir(source: Path, needed: list[NeededFile]) -> Path:
    """The folder of task folders inside ``source``: ``source/data`` or ``source`` itself."""
    if not source.is_dir():
        raise ValueError(f"--source {str(source)!r} is not a directory")
    inner = source / HUB_DATA
    tasks = {f.task for f in needed}
    here = sorted(t for t in tasks if (source / t).is_dir())
    if inner.is_dir():
        if here:
            raise ValueError(f"--source {str(source)!r} is ambiguous: it has a {HUB_DATA}/ folder and task "
                             f"folders of its own ({here[:3]}); give the folder that holds the task folders")
        return inner
    if here:
        return source
    raise ValueError(f"--source {str(source)!r}: neither a {HUB_DATA}/ folder nor any of the split's task "
                     f"folders (e.g. {sorted(tasks)[:3]}) inside; give the dataset clone's root or its "
                     f"{HUB_DATA}/ folder")


def _check_present(data_dir: Path, needed: list[NeededFile], optional: set[str], where: str) -> list[NeededFile]:
    """``needed`` less optional training tasks that are absent (warned). Raises one error naming
    every missing file, and one naming every Git LFS pointer (a clone without ``git lfs pull``)."""
    missing = [f for f in needed if not (data_dir / f.rel).is_file()]
    skip = [f for f in missing if f.part == "train" and f.task in optional]
    if skip:
        log.warning("optional training task(s) absent from %s, skipped: %s", where, [f.task for f in skip])
    missing = [f for f in missing if f not in skip]
    if missing:
        tasks = sorted({f.task for f in missing})
        lines = "\n".join(f"  {f.task} [{f.part}]: {data_dir / f.rel}" for f in missing)
        raise ValueError(f"{len(missing)} of {len(needed)} file(s) missing from {where} "
                         f"({len(tasks)} task(s): {tasks}):\n{lines}")
    kept = [f for f in needed if f not in skip]
    pointers = [f for f in kept if _is_lfs_pointer(data_dir / f.rel)]
    if pointers:
        lines = "\n".join(f"  {data_dir / f.rel}" for f in pointers)
        raise ValueError(f"{len(pointers)} file(s) in {where} are Git LFS pointers, not data (run "
                         f"`git lfs install && git lfs pull` in the clone):\n{lines}")
    return kept


def _is_lfs_pointer(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(_LFS_POINTER)) == _LFS_POINTER


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub read it at import, or as the environment says now."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.is_offline_mode() or env)


def _offline_error(needed: list[NeededFile], revision: str, why: str) -> RuntimeError:
    eg = ", ".join(f.hub_path for f in needed[:2]) + (", ..." if len(needed) > 2 else "")
    why = " ".join(str(why).split())[:200]  # one line
    return RuntimeError(
        f"cannot download the MetaICL task files ({why}): this needs network access to huggingface.co "
        f"for dataset {HUB_REPO} at revision {revision} ({len(needed)} files, e.g. {eg}), or "
        f"--source DIR with a local clone (git clone {HUB_URL}; git lfs pull)"
    )


def _root_cause(e: BaseException) -> str:
    """The first cause in the chain (the hub wraps e.g. a ConnectError in a LocalEntryNotFoundError
    with a paragraph of its own): its type and first line."""
    while e.__cause__ is not None:
        e = e.__cause__
    first = next((line for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _hub_errors():
    """(offline-like errors, other hub errors) as the installed huggingface_hub raises them."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    offline = [LocalEntryNotFoundError, OfflineModeIsEnabled]  # IncompleteSnapshotError is a LocalEntry...
    for mod in ("httpx2", "httpx"):  # huggingface_hub >= 1.0 talks HTTP through httpx (2.x: httpx2)
        try:
            offline.append(__import__(mod).TransportError)  # connect/read/timeout/proxy errors
            break
        except (ImportError, AttributeError):
            continue
    try:
        import requests  # huggingface_hub < 1.0

        offline.append(requests.ConnectionError)
    except ImportError:
        pass
    return tuple(offline), (HfHubHTTPError,)


def _download(needed: list[NeededFile], revision: str, progress: bool) -> Path:
    """Fetch ``needed`` from the hub into the download cache; returns its ``data/`` folder."""
    local = download_cache_dir(revision)
    data = local / HUB_DATA
    cached = all((data / f.rel).is_file() for f in needed)  # the hub moves a file in once complete
    offline = _hub_offline()
    if cached and (offline or _COMMIT_RE.fullmatch(revision)):
        if not _COMMIT_RE.fullmatch(revision):
            log.warning("HF_HUB_OFFLINE is set: using the cached files of revision %r, which may have moved since",
                        revision)
        log.info("all %d files already in the download cache %s; nothing to download", len(needed), local)
        return data
    if offline:  # the hub would only look in its caches; say what is needed instead
        raise _offline_error(needed, revision, "HF_HUB_OFFLINE is set")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise RuntimeError(f"downloading from the hub needs huggingface_hub (pip install huggingface_hub): {e}; "
                           f"or give --source DIR with a local clone (git clone {HUB_URL})") from None
    offline, http = _hub_errors()
    local.mkdir(parents=True, exist_ok=True)
    log.info("downloading %d files of %s (revision %s, licence %s) into %s; a stopped download resumes",
             len(needed), HUB_REPO, revision, LICENSE, local)
    kwargs = {} if progress else {"tqdm_class": _silent_tqdm()}
    try:
        snapshot_download(HUB_REPO, repo_type="dataset", revision=revision, local_dir=local,
                          allow_patterns=[glob.escape(f.hub_path) for f in needed], **kwargs)
    except offline as e:
        raise _offline_error(needed, revision, _root_cause(e)) from None
    except http as e:  # repository/revision not found, gated, server errors: not an offline machine
        raise RuntimeError(f"huggingface.co refused {HUB_REPO} at revision {revision}: "
                           f"{type(e).__name__}: {' '.join(str(e).split())[:300]}; "
                           f"or give --source DIR with a local clone (git clone {HUB_URL})") from None
    return data


def _silent_tqdm():
    from tqdm.auto import tqdm

    class Silent(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


# -- writing ----------------------------------------------------------------------------------------

def _copy_hashed(src: Path, dest: Path) -> dict:
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        for block in iter(lambda: fin.read(_COPY_CHUNK), b""):
            digest.update(block)
            fout.write(block)
            size += len(block)
    shutil.copystat(src, dest)
    return {"bytes": size, "sha256": digest.hexdigest()}


def _assemble(data_dir: Path, files: list[NeededFile], tmp: Path, progress: bool) -> dict[str, dict]:
    from tqdm import tqdm

    out = {}
    for f in tqdm(files, desc="copying task files", unit="file", disable=not progress or len(files) < 20):
        out[f.rel] = _copy_hashed(data_dir / f.rel, tmp / f.rel)
    return out


_ATTRIBUTION = """# Data sources

Built by `abmll-data prepare metaicl --split {split}` from {source}.

- `{repo}` on the Hugging Face Hub ({url}),
  licence {licence} (non-commercial use): the task files of MetaICL (Min et al., 2022, "MetaICL:
  Learning to Learn In Context"), made from CrossFit (Ye et al., 2021) and UnifiedQA (Khashabi
  et al., 2020) tasks. Each source dataset keeps its own terms; check them before redistributing
  these files.
"""


def _validate(tmp: Path, split: str, split_file, k, seed) -> list:
    """``load_split`` on the staged files (what ``abmll-data check`` runs); its reports."""
    from .splits import load_split

    s = load_split(split, str(tmp), split_file=None if split_file is None else str(split_file), k=k, seed=seed)
    return s.report


def _summary(split, split_file, naming, source, revision, needed, files, hashes, reports, t0) -> dict:
    return {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(time.time() - t0, 1),
        "split": split,
        "split_file": None if split_file is None else str(split_file),
        "source": source,
        "revision": revision,
        "dataset": HUB_REPO,
        "license": LICENSE,
        "requested": sorted(f.rel for f in needed),  # what a rerun compares (optional tasks included)
        "file_naming": naming,
        "tasks": {p: sorted({f.task for f in files if f.part == p}) for p in PARTS},
        "n_tasks": len({f.task for f in files}),
        "files": {f.rel: dict(hashes[f.rel], part=f.part, task=f.task) for f in files},
        "report": [{"task": r.task, "part": r.part, "kept": r.kept, "dropped": r.dropped, "reasons": r.reasons}
                   for r in reports],
        "kept": sum(r.kept for r in reports),
        "dropped": sum(r.dropped for r in reports),
    }


def _same_request(summary: dict, split: str, needed: list[NeededFile]) -> bool:
    return (summary.get("kind") == KIND and summary.get("split") == split
            and summary.get("requested") == sorted(f.rel for f in needed))


def prepare_metaicl(
    split: str,
    out: str | os.PathLike,
    *,
    source: str | os.PathLike | None = None,
    revision: str = DEFAULT_REVISION,
    rebuild: bool = False,
    k=None,
    seed=None,
    split_file: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Build (or find already built) ``out`` with the split's MetaICL task files; returns the
    summary written to ``out/.complete.json`` (plus ``skipped``: True when nothing was done).

    ``source``: a local clone of ``allenai/metaicl-data`` (or its ``data/``) instead of the hub.
    ``revision``: the hub revision (default: the pinned commit). ``k``/``seed``/``split_file``: as
    in ``load_split``. Raises ``ValueError`` (bad request, missing or malformed files, refused
    ``out``) or ``RuntimeError`` (the hub cannot be reached or refuses).
    """
    t0 = time.time()
    needed = needed_files(split, split_file=split_file, k=k, seed=seed)
    naming = file_naming(_split_def(split, split_file), k, seed)
    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out.parent):  # one build per parent: the leftovers below are nobody's
        clean_stale(out, is_complete=lambda p: (p / MARKER).is_file())
        done = _existing(out, split, needed, rebuild)
        if done is not None:
            return done
        if source is not None:
            data_dir = _source_data_dir(Path(source).expanduser().resolve(), needed)
            where, src_name, rev = f"--source {str(data_dir)!r}", str(data_dir), None
        else:
            data_dir = _download(needed, revision, progress)
            where, src_name, rev = f"{HUB_REPO} at revision {revision} (downloaded to {data_dir})", HUB_REPO, revision
        files = _check_present(data_dir, needed, _optional(split, split_file), where)
        # `out` is, at every moment, absent, the old complete build or the new complete one.
        with staged_dir(out) as tmp:
            hashes = _assemble(data_dir, files, tmp, progress)
            reports = _validate(tmp, split, split_file, k, seed)
            (tmp / "ATTRIBUTION.md").write_text(_ATTRIBUTION.format(
                split=split, source=src_name if rev is None else f"{HUB_REPO} at revision {rev}", repo=HUB_REPO,
                url=HUB_URL, licence=LICENSE))
            summary = _summary(split, split_file, naming, src_name, rev, needed, files, hashes, reports, t0)
            (tmp / MARKER).write_text(json.dumps(summary, indent=1, sort_keys=True))  # last: complete
    log.info("split %s written to %s in %.1f s: %d tasks, %d files", split, out, time.time() - t0,
             summary["n_tasks"], len(files))
    summary["skipped"] = False
    return summary


def _existing(out: Path, split: str, needed: list[NeededFile], rebuild: bool) -> dict | None:
    """The summary of a complete ``out`` of this request (nothing to do), else None (build);
    raises for an ``out`` that must not be touched."""
    marker = out / MARKER
    if marker.is_file():
        summary = json.loads(marker.read_text())
        if rebuild:
            return None
        if not _same_request(summary, split, needed):
            what = (f"split {summary.get('split')!r} ({len(summary.get('files', {}))} files)"
                    if summary.get("kind") == KIND else "another build (not `prepare metaicl`)")
            raise ValueError(f"--out {str(out)!r} holds a complete build of {what}, not of split {split!r} "
                             f"with these {len(needed)} files; use --rebuild to replace it, or another --out")
        log.info("%s is already complete (split %s, %d files, built %s); nothing to do (use --rebuild to rebuild)",
                 out, split, len(summary.get("files", {})), summary.get("built_at", "?"))
        summary["skipped"] = True
        return summary
    if out.exists() and (out.is_file() or any(out.iterdir())):
        # never taken for a finished build, and never deleted by us (it may be someone's data)
        raise ValueError(f"--out {str(out)!r} exists and is not a finished `prepare metaicl` build (no {MARKER}); "
                         f"remove it yourself or choose another --out")
    return None


def summary_line(summary: dict) -> str:
    """One line for the CLI: tasks, files, kept/dropped, source."""
    t = summary.get("tasks", {})
    src = summary.get("source")
    if summary.get("revision"):
        src = f"{src}@{summary['revision'][:12]}"
    return (f"split {summary.get('split')}: {len(t.get('train', []))} train tasks, {len(t.get('val', []))} val, "
            f"{len(t.get('test', []))} test; {len(summary.get('files', {}))} files, {summary.get('kept', 0)} "
            f"examples kept, {summary.get('dropped', 0)} dropped (2-4 options kept); from {src}")
