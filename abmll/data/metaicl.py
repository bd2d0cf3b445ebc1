"""MetaICL task files and split definitions.

Layout: ``DATA_DIR/{task}/{task}_{k}_{seed}_{part}.jsonl``, one JSON object a line with
``task``, ``input``, ``output`` and ``options``. File names follow MetaICL's preprocessing:

=========  ===============================  =====================================
part       file                             MetaICL origin
=========  ===============================  =====================================
``train``  ``{task}_16384_100_train.jsonl``  ``_build_gym.py --do_train`` (k=16384)
``val``    ``{task}_16_100_dev.jsonl``       ``--do_test``, k=16, seed 100
``test``   ``{task}_16_100_test.jsonl``      ``--do_test``, k=16, seed 100 (full test set)
=========  ===============================  =====================================

``k`` and ``seed`` can be changed per part (see :func:`parse_file_spec`): a split YAML may
carry a ``files:`` mapping, and ``load_split(k=..., seed=...)`` overrides both.

Files are parsed line by line with the standard ``json`` module (not ``datasets``) so that
every error names the file and the line. Parsed files are cached in-process by
(path, size, mtime).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .examples import MCExample, SplitTasks

__all__ = [
    "DEFAULT_FILES",
    "MAX_OPTIONS",
    "MIN_OPTIONS",
    "TaskReport",
    "format_report",
    "load_split_from_dir",
    "parse_file_spec",
    "file_naming",
    "read_split_def",
    "split_def",
    "read_task_file",
    "task_file",
]

log = logging.getLogger(__name__)

MIN_OPTIONS, MAX_OPTIONS = 2, 4
PARTS = ("train", "val", "test")
FILE_SUFFIX = {"train": "train", "val": "dev", "test": "test"}
DEFAULT_FILES = {"train": {"k": 16384, "seed": 100}, "val": {"k": 16, "seed": 100}, "test": {"k": 16, "seed": 100}}
REQUIRED = ("task", "input", "output", "options")


@dataclass
class TaskReport:
    """How one task file loaded."""

    task: str
    part: str  # train | val | test
    path: str
    kept: int
    dropped: int
    reasons: dict[str, int] = field(default_factory=dict)  # why examples were dropped
    options: tuple[int, ...] = ()  # distinct option counts among kept examples
    excluded: bool = False  # a training task with nothing left after the 2-4 filter


def task_file(data_dir: str | os.PathLike, task: str, part: str, k: int | str, seed: int | str) -> Path:
    return Path(data_dir) / task / f"{task}_{k}_{seed}_{FILE_SUFFIX[part]}.jsonl"


_CACHE: dict[tuple[str, int, int, str], tuple[list[MCExample], Counter, Counter]] = {}


def _parse(path: Path, task: str) -> tuple[list[MCExample], Counter, Counter]:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, task)
    if key in _CACHE:
        return _CACHE[key]
    examples: list[MCExample] = []
    dropped: Counter = Counter()
    n_opts: Counter = Counter()
    n_lines = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            n_lines += 1
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            missing = [k for k in REQUIRED if k not in obj]
            if missing:
                raise ValueError(f"{where}: missing field(s) {missing} (each line needs {list(REQUIRED)})")
            inp, out, opts = obj["input"], obj["output"], obj["options"]
            if not isinstance(inp, str) or not isinstance(out, str):
                raise ValueError(f"{where}: 'input' and 'output' must be strings")
            if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
                raise ValueError(f"{where}: 'options' must be a list of strings")
            if len(opts) < MIN_OPTIONS:
                dropped[f"<{MIN_OPTIONS} options"] += 1
                continue
            if len(opts) > MAX_OPTIONS:
                dropped[f">{MAX_OPTIONS} options"] += 1
                continue
            if out not in opts:
                raise ValueError(f"{where}: output {out!r} is not among options {opts}")
            if len(set(opts)) != len(opts):
                dropped["duplicate options"] += 1
                continue
            examples.append(MCExample(task=task, input=inp, options=tuple(opts), output=out, line=lineno))
            n_opts[len(opts)] += 1
    if n_lines == 0:
        raise ValueError(f"{path}: empty task file (no examples)")
    _CACHE[key] = (examples, dropped, n_opts)
    return examples, dropped, n_opts


def read_task_file(path: str | os.PathLike, task: str | None = None, part: str = "train") -> tuple[list[MCExample], TaskReport]:
    """Read and validate one MetaICL jsonl file; keep examples with 2-4 options.

    Raises ``ValueError`` naming the file and line for a malformed line, a missing field, or an
    ``output`` not among ``options``; and naming the file for an empty file.
    """
    path = Path(path)
    task = task or path.parent.name
    examples, dropped, n_opts = _parse(path, task)
    report = TaskReport(
        task=task, part=part, path=str(path), kept=len(examples), dropped=sum(dropped.values()),
        reasons=dict(dropped), options=tuple(sorted(n_opts)),
    )
    return list(examples), report


def format_report(reports: list[TaskReport]) -> str:
    """A plain-text table: task, part, kept, dropped (why), option counts."""
    rows = [("task", "part", "kept", "dropped", "options", "note")]
    for r in reports:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(r.reasons.items()))
        opts = "-".join(str(o) for o in (r.options[0], r.options[-1])) if len(r.options) > 1 else "".join(map(str, r.options))
        rows.append((r.task, r.part, str(r.kept), f"{r.dropped}" + (f" ({why})" if why else ""), opts or "-",
                     "EXCLUDED (nothing left)" if r.excluded else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    tk, td = sum(r.kept for r in reports), sum(r.dropped for r in reports)
    lines.append(f"total: {tk} kept, {td} dropped in {len(reports)} files")
    return "\n".join(lines)


# -- split definitions ------------------------------------------------------------------------

def _splits_dir() -> Path:
    return Path(__file__).resolve().parent / "splits"


def known_splits() -> list[str]:
    return ["tiny"] + sorted(p.stem for p in _splits_dir().glob("*.yaml"))


def _task_list(value, key: str, source: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{source}: `{key}` must be a list of task names, got {type(value).__name__}")
    bad = [v for v in value if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ValueError(f"{source}: `{key}` has entries that are not task names: {bad}")
    dup = sorted({t for t in value if value.count(t) > 1})
    if dup:
        raise ValueError(f"{source}: `{key}` names tasks more than once: {dup}")
    return list(value)


def read_split_def(path: str | os.PathLike) -> dict:
    """Parse a split YAML/JSON file: ``train``, ``val``, ``test`` task lists; optional keys
    ``files`` (file naming per part, e.g. ``{train: {k: 16384, seed: 100}}``), ``optional``
    (training tasks that may be absent from the data directory: skipped with a warning) and
    ``description``.

    ``val`` defaults to the ``test`` list (as in the paper's splits). A task may not be both a
    training task and an unseen (val/test) task.
    """
    import yaml  # PyYAML comes with omegaconf

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"split file {str(path)!r} (config key `data.split_file`) does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML/JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a split file is a mapping with keys train, val, test")
    unknown = sorted(set(raw) - {"train", "val", "test", "files", "optional", "description"})
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; allowed: train, val, test, files, optional, description")
    train = _task_list(raw.get("train"), "train", str(path))
    test = _task_list(raw.get("test"), "test", str(path))
    val = _task_list(raw.get("val"), "val", str(path)) if raw.get("val") is not None else list(test)
    if not train:
        raise ValueError(f"{path}: `train` lists no tasks")
    if not test:
        raise ValueError(f"{path}: `test` lists no tasks")
    both = sorted(set(train) & (set(val) | set(test)))
    if both:
        raise ValueError(f"{path}: tasks both in `train` and in `val`/`test`: {both}")
    files = parse_file_spec(raw.get("files"), f"{path}: `files`")
    optional = _task_list(raw.get("optional"), "optional", str(path))
    stray = sorted(set(optional) - set(train))
    if stray:
        raise ValueError(f"{path}: `optional` may only name training tasks; not in `train`: {stray}")
    return {"train": train, "val": val, "test": test, "files": files, "optional": optional}


def _one(value, what: str) -> str:
    s = str(value).strip()
    if not s or any(c in s for c in "/\\_ "):
        raise ValueError(f"{what}: {value!r} is not a valid file-name component")
    return s


def parse_file_spec(spec, what: str = "files") -> dict[str, dict[str, str]]:
    """Normalise a split file's ``files`` mapping ``{train: {k: .., seed: ..}, val: .., test: ..}``
    into ``{part: {"k": .., "seed": ..}}`` (only the parts and keys given)."""
    out: dict[str, dict[str, str]] = {}
    if spec is None:
        return out
    if not isinstance(spec, Mapping):
        raise ValueError(f"{what} must be a mapping like {{train: {{k: 16384, seed: 100}}}}")
    for part, pspec in spec.items():
        p = "val" if part == "dev" else part
        if p not in PARTS:
            raise ValueError(f"{what}: unknown part {part!r}; use train, val (or dev), test")
        if not isinstance(pspec, Mapping) or set(pspec) - {"k", "seed"}:
            raise ValueError(f"{what}.{part} must be a mapping with keys k and/or seed")
        out[p] = {kk: _one(v, f"{what}.{part}.{kk}") for kk, v in pspec.items()}
    return out


def _part_values(value, key: str) -> dict[str, str]:
    """``k``/``seed`` override: a scalar (all parts), a mapping {train: .., val: .., test: ..},
    or a string "train:16384,val:16,test:16" (no '=' so that it survives `tune run` overrides)."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, str) and ":" in value:
        items = []
        for chunk in value.split(","):
            if ":" not in chunk:
                raise ValueError(f"config key `data.{key}`: cannot parse {value!r}; use e.g. 'train:16384,val:16,test:16'")
            a, b = chunk.split(":", 1)
            items.append((a.strip(), b.strip()))
    else:
        return {p: _one(value, f"config key `data.{key}`") for p in PARTS}
    out = {}
    for part, v in items:
        p = "val" if part == "dev" else part
        if p not in PARTS:
            raise ValueError(f"config key `data.{key}`: unknown part {part!r}; use train, val (or dev), test")
        out[p] = _one(v, f"config key `data.{key}`")
    return out


def split_def(split: str, split_file: str | os.PathLike | None = None) -> dict:
    """The definition of ``split``: the YAML/JSON ``split_file`` when given, else the packaged
    ``splits/{split}.yaml``; an unknown name is one error listing the known ones."""
    if split_file is not None:
        return read_split_def(split_file)
    if split not in known_splits() or split == "tiny":
        raise ValueError(
            f"unknown split {split!r} (config key `split`); known splits: {known_splits()}, "
            f"or give a split file with `data.split_file`"
        )
    return read_split_def(_splits_dir() / f"{split}.yaml")


def file_naming(sdef: dict, k=None, seed=None) -> dict[str, dict]:
    """``k`` and ``seed`` of each part's file name: MetaICL's defaults, then the split file's
    ``files:``, then the ``k`` / ``seed`` overrides (see :func:`parse_file_spec`)."""
    naming = {p: dict(DEFAULT_FILES[p]) for p in PARTS}
    for p, spec in sdef["files"].items():
        naming[p].update(spec)
    for key, val in (("k", k), ("seed", seed)):
        for p, v in _part_values(val, key).items():
            naming[p][key] = v
    return naming


def load_split_from_dir(
    split: str,
    data_dir: str | os.PathLike | None,
    *,
    split_file: str | os.PathLike | None = None,
    k=None,
    seed=None,
) -> SplitTasks:
    """Load a split's tasks from a MetaICL-layout directory (see the module docstring)."""
    sdef = split_def(split, split_file)
    if data_dir is None:
        raise ValueError(
            f"split {split!r} reads MetaICL task files: set `data.data_dir` to the directory that holds "
            f"{{task}}/{{task}}_{{k}}_{{seed}}_{{train,dev,test}}.jsonl"
        )
    data_dir = Path(os.path.expanduser(str(data_dir)))
    if not data_dir.is_dir():
        raise ValueError(f"`data.data_dir` {str(data_dir)!r} is not a directory")

    naming = file_naming(sdef, k, seed)

    wanted = [(p, t) for p in PARTS for t in sdef[p]]
    paths = {(p, t): task_file(data_dir, t, p, naming[p]["k"], naming[p]["seed"]) for p, t in wanted}
    missing = [(p, t) for (p, t) in wanted if not paths[(p, t)].is_file()]
    absent_optional = [t for p, t in missing if p == "train" and t in sdef["optional"]]
    if absent_optional:
        log.warning("split %s: optional training task(s) absent from %s, skipped: %s", split, data_dir, absent_optional)
        wanted = [(p, t) for p, t in wanted if not (p == "train" and t in absent_optional)]
        missing = [(p, t) for p, t in missing if not (p == "train" and t in absent_optional)]
    if missing:
        lines = []
        for p, t in missing:
            d = data_dir / t
            have = sorted(x.name for x in d.glob("*.jsonl"))[:6] if d.is_dir() else None
            hint = f" (directory has: {have})" if have else (" (no such task directory)" if have is None else " (no .jsonl files)")
            lines.append(f"  {t} [{p}]: {paths[(p, t)]}{hint}")
        names = sorted({t for _, t in missing})
        raise ValueError(
            f"split {split!r}: {len(names)} task(s) missing under `data.data_dir` {str(data_dir)!r}: {names}\n"
            f"expected files "
            f"(file naming k/seed per part: {naming}; change with `data.k` / `data.seed`):\n" + "\n".join(lines)
        )

    out = {p: {} for p in PARTS}
    reports: list[TaskReport] = []
    for p, t in wanted:
        exs, rep = read_task_file(paths[(p, t)], t, p)
        if not exs:
            if p == "train":
                rep.excluded = True
                log.warning("task %s (%s): no example has %d-%d options; excluded from meta-training",
                            t, paths[(p, t)], MIN_OPTIONS, MAX_OPTIONS)
            else:
                raise ValueError(
                    f"{paths[(p, t)]}: task {t!r} has no example with {MIN_OPTIONS}-{MAX_OPTIONS} options "
                    f"({rep.dropped} dropped: {rep.reasons}); it cannot be evaluated"
                )
        else:
            out[p][t] = exs
        reports.append(rep)
    if not out["train"]:
        raise ValueError(f"split {split!r}: no training task has examples with {MIN_OPTIONS}-{MAX_OPTIONS} options")
    log.info("split %s from %s:\n%s", split, data_dir, format_report(reports))
    return SplitTasks(name=split, train=out["train"], val=out["val"], test=out["test"], report=reports)
