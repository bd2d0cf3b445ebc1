"""A user's own multiple-choice examples, for ``abmll adapt``: any file ``datasets`` reads.

The file's extension picks the ``datasets.load_dataset`` builder (:data:`FORMATS`): ``.jsonl``
and ``.json`` (MetaICL's task files are jsonl with ``input``, ``options`` and ``output``, the
default columns), ``.csv``, ``.tsv`` and ``.parquet``. Columns are mapped by name
(:class:`Columns`); the options come from a list column (a string holding a JSON list is read
as one) or are the same for every row (``Columns.fixed_options``, ``--options "yes,no"``).

A label is the text of one of the row's options, or an integer index into them when the column
is an integer column. An empty label (a blank CSV cell, a JSON null) marks an unlabelled row,
allowed only where labels are optional (the query file). Rows are counted from 1, the header
excluded (a jsonl file's row N is its line N); every error names the file, the row and the
column.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Tuple

from .examples import MCExample
from .metaicl import MAX_OPTIONS, MIN_OPTIONS

__all__ = ["FORMATS", "Columns", "UserExample", "UserFileError", "parse_fixed_options", "read_user_examples"]

#: extension -> (``datasets.load_dataset`` builder, its keyword arguments)
FORMATS = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".parquet": ("parquet", {}),
}


class UserFileError(ValueError):
    """A user file cannot be used; the message names the file, row and column."""


@dataclass(frozen=True)
class Columns:
    """Which column holds what (the ``abmll adapt`` flags of the same names)."""

    input: str = "input"
    options: str = "options"
    label: str = "output"
    # The same options for every row (then no options column is read).
    fixed_options: Optional[Tuple[str, ...]] = None

    def flag(self, which: str) -> str:
        return f"--{which}-column"


@dataclass(frozen=True)
class UserExample:
    """One row: the example (an unlabelled row carries its first option as a placeholder
    ``output``, never used), its 1-based row and whether it has a label."""

    example: MCExample
    row: int
    labelled: bool


def _load(path: Path):
    builder = FORMATS.get(path.suffix.lower())
    if builder is None:
        raise UserFileError(
            f"{path}: unknown file type {path.suffix!r}; abmll adapt reads {', '.join(FORMATS)}"
        )
    if not path.is_file():
        raise UserFileError(f"{path}: no such file")
    import datasets

    name, kwargs = builder
    try:
        return datasets.load_dataset(name, data_files=str(path), split="train", **kwargs)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; one line names the file
        msg = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise UserFileError(f"{path}: cannot be read as {name}: {msg}") from None


def _options(value: Any, where: str) -> Tuple[str, ...]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise UserFileError(
                f"{where}: {value!r} is not a list of options (a list, or a JSON list such as "
                f'["yes", "no"]; or give every row the same options with --options "yes,no")'
            ) from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(o, (str, int, float)) for o in value):
        raise UserFileError(f"{where}: {value!r} is not a list of options")
    options = tuple(str(o) for o in value)
    if not MIN_OPTIONS <= len(options) <= MAX_OPTIONS:
        raise UserFileError(f"{where}: {len(options)} options; the prompt takes {MIN_OPTIONS}-{MAX_OPTIONS} (A-D)")
    if len(set(options)) != len(options):
        raise UserFileError(f"{where}: the options {list(options)} repeat one")
    return options


def _label(value: Any, options: Tuple[str, ...], integer_column: bool, where: str) -> Optional[str]:
    """The label as the text of an option; None for an empty cell."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if integer_column and not isinstance(value, bool):
        if not 0 <= int(value) < len(options):
            raise UserFileError(f"{where}: answer index {value} is out of range for {len(options)} options {list(options)}")
        return options[int(value)]
    text = str(value)
    if text not in options:
        raise UserFileError(f"{where}: answer {text!r} is not among the options {list(options)}")
    return text


def read_user_examples(
    path: Path,
    task: str,
    columns: Columns = Columns(),
    *,
    labels: str = "required",
) -> List[UserExample]:
    """The rows of ``path`` as examples of ``task``. ``labels``: ``"required"`` (every row
    labelled, e.g. support examples) or ``"optional"`` (the query)."""
    if labels not in ("required", "optional"):
        raise ValueError(f"labels must be 'required' or 'optional', got {labels!r}")
    path = Path(path)
    data = _load(path)
    needed = [("input", columns.input)]
    if columns.fixed_options is None:
        needed.append(("options", columns.options))
    if labels == "required" or columns.label in data.column_names:
        needed.append(("label", columns.label))
    for which, name in needed:
        if name not in data.column_names:
            raise UserFileError(
                f"{path}: no column {name!r} (its columns: {', '.join(map(repr, data.column_names))}); "
                f"name the {which} column with {columns.flag(which)}"
                + (' or give fixed options with --options "a,b"' if which == "options" else "")
            )
    if len(data) == 0:
        raise UserFileError(f"{path}: no rows")
    has_label = columns.label in data.column_names
    integer_label = has_label and str(data.features[columns.label].dtype).startswith(("int", "uint"))
    out: List[UserExample] = []
    for i, record in enumerate(data):
        row = i + 1
        text = record[columns.input]
        if text is None:
            raise UserFileError(f"{path}, row {row}, column {columns.input!r}: empty input")
        options = (
            columns.fixed_options
            if columns.fixed_options is not None
            else _options(record[columns.options], f"{path}, row {row}, column {columns.options!r}")
        )
        answer = (
            _label(record[columns.label], options, integer_label, f"{path}, row {row}, column {columns.label!r}")
            if has_label
            else None
        )
        if answer is None and labels == "required":
            raise UserFileError(f"{path}, row {row}, column {columns.label!r}: no answer (every support row needs one)")
        example = MCExample(task, str(text), options, answer if answer is not None else options[0], line=row)
        out.append(UserExample(example, row, answer is not None))
    return out


def parse_fixed_options(text: Optional[str]) -> Optional[Tuple[str, ...]]:
    """``--options "yes,no"`` -> ("yes", "no") (None passes through)."""
    if text is None:
        return None
    options = tuple(o.strip() for o in text.split(","))
    if not MIN_OPTIONS <= len(options) <= MAX_OPTIONS or not all(options) or len(set(options)) != len(options):
        raise UserFileError(
            f"--options {text!r}: give {MIN_OPTIONS}-{MAX_OPTIONS} distinct, non-empty options separated by commas"
        )
    return options

