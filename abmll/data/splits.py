"""Split definitions and :func:`load_split`."""

from __future__ import annotations

import logging

from .examples import SplitTasks
from .tiny import tiny_split

__all__ = ["known_splits", "load_split", "task_lists_sha256"]

log = logging.getLogger(__name__)


def known_splits() -> list[str]:
    """``tiny`` plus every ``splits/*.yaml`` shipped with the package."""
    from .metaicl import known_splits as _known

    return _known()


def load_split(
    split: str,
    data_dir: str | None = None,
    *,
    split_file: str | None = None,
    k: int | str | dict | None = None,
    seed: int | str | dict | None = None,
) -> SplitTasks:
    """Load the tasks of a split.

    ``split="tiny"`` (with ``data_dir`` None) is the built-in synthetic task set. Any other name
    is a split definition (``abmll/data/splits/{split}.yaml``, or the YAML/JSON ``split_file``,
    whose ``split`` is then only a name) whose tasks are read from ``data_dir`` in MetaICL's
    layout: train = training tasks' train files, val = unseen tasks' dev files, test = unseen
    tasks' test files. ``k`` / ``seed`` override the file naming (MetaICL defaults: train
    ``_16384_100_``, dev/test ``_16_100_``): a scalar applies to all parts; a mapping or a string
    ``"train:16384,val:16,test:16"`` sets parts separately.
    """
    if split == "tiny" and split_file is None:
        if data_dir is not None:
            raise ValueError(
                f"split 'tiny' is built in and reads no files, but `data.data_dir` is set to {str(data_dir)!r}; "
                f"unset it (null) or choose another `split`"
            )
        return tiny_split()
    from .metaicl import load_split_from_dir

    return load_split_from_dir(split, data_dir, split_file=split_file, k=k, seed=seed)


def task_lists_sha256(split: SplitTasks) -> str:
    """SHA-256 of the split's sorted train/val/test task names: two runs with the same split
    name but different tasks (a ``data.split_file``) get different hashes."""
    import hashlib
    import json

    lists = {part: sorted(getattr(split, part)) for part in ("train", "val", "test")}
    return hashlib.sha256(json.dumps(lists, sort_keys=True).encode()).hexdigest()
