"""Per-example predictions on disk: one Parquet row per evaluated example.

Why Parquet: it is the compact, typed, columnar standard that both ``pandas.read_parquet`` and
``datasets.load_dataset("parquet", ...)`` read without options, it stores the option
probabilities as a list column (no string parsing, no float rounding), and ``pyarrow``, which
writes it, is already installed with ``datasets``. A test run's 480 rows take ~40 kB.

Columns (:data:`COLUMNS`): ``task``; ``example`` (index among the task's loaded examples, what
the sampler uses); ``line`` (1-based line of the task's jsonl file; -1 for built-in tasks);
``label``; ``num_options``; ``probs`` (the predictive: mean over samples); ``pred``;
``max_prob``, ``entropy``, ``expected_entropy``, ``mutual_info`` (the decomposition, nats);
and, where measured, ``probs_mean_mode`` (the same adapted model in mean mode) and
``probs_ts`` / ``temperature`` (the temperature-scaled predictive and its task's temperature).
``abmll adapt`` writes the same columns for the user's query file (``line``: the file's row;
``label``: null for an unlabelled row) and four more: ``input``, ``options``, ``answer`` (the
predicted option's text) and ``abstain``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

from abmll.atomic import atomic_write

__all__ = ["COLUMNS", "write_predictions", "read_predictions"]

COLUMNS = (
    "task", "example", "line", "label", "num_options", "probs", "pred", "max_prob", "entropy",
    "expected_entropy", "mutual_info", "probs_mean_mode", "probs_ts", "temperature",
    "input", "options", "answer", "abstain",
)


def write_predictions(rows: Sequence[Dict[str, Any]], path: Path) -> Path:
    """Write ``rows`` (dicts with :data:`COLUMNS`' keys; optional ones may be absent in all
    rows) atomically: a reader never sees a half-written file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    present = [c for c in COLUMNS if any(c in r for r in rows)] if rows else list(COLUMNS[:11])
    table = pa.table({c: [r.get(c) for r in rows] for c in present})
    return atomic_write(Path(path), lambda tmp: pq.write_table(table, tmp))


def read_predictions(path: Path) -> List[Dict[str, Any]]:
    """The rows of a predictions file, as dicts (no pandas needed)."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()
