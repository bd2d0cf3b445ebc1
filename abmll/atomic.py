"""Write a file or a folder so that a reader (or a stopped run) never sees it half written.

A file: :func:`atomic_write` writes a hidden sibling, then renames it over the target. A folder:
:func:`staged_dir` yields a hidden sibling folder to fill; when the block completes, it is
swapped into place (an existing folder is moved aside first and deleted after), and when the
block fails it is deleted and the target is left as it was. The sibling names say whose they
are (``.{name}.partial-*``, ``.{name}.old-*``), so :func:`clean_stale` can remove what a killed
process left, and put back a complete folder that a crash caught between the two renames of a
swap.

Temporary names are unique per process and call, so two writers never share one. Files and
folders get the permissions the umask gives a new file or folder, not ``tempfile``'s 0600/0700.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

PathLike = Union[str, Path]

PARTIAL = "partial"
OLD = "old"


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write(path: PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a hidden sibling path, then rename it to ``path``.

    If ``write`` fails, the sibling is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = _sibling(path, "tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: PathLike, text: str, *, parents: bool = False) -> Path:
    """:func:`atomic_write` of ``text``; ``parents``: create the missing parent folders first."""
    if parents:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_copy(src: PathLike, dest: PathLike) -> Path:
    """Copy the file ``src`` to ``dest`` atomically."""
    return atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp))


def clean_stale(path: PathLike, is_complete: Optional[Callable[[Path], bool]] = None) -> None:
    """Remove the ``.{name}.partial-*`` / ``.{name}.old-*`` siblings of ``path``.

    If ``path`` is missing and an ``old`` sibling is complete (``is_complete``), that one is first
    renamed back to ``path``: a crash between the two renames of a swap loses nothing.
    Call it only while no other process stages ``path`` (hold a lock): it cannot tell a
    leftover from a sibling in use.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return
    stale = sorted(path.parent.glob(f".{path.name}.{PARTIAL}-*"))
    old = sorted(path.parent.glob(f".{path.name}.{OLD}-*"), key=lambda p: p.stat().st_mtime)
    if is_complete is not None and not path.exists():
        for candidate in reversed(old):
            if candidate.is_dir() and is_complete(candidate):
                os.rename(candidate, path)
                old.remove(candidate)
                break
    for leftover in stale + old:
        shutil.rmtree(leftover, ignore_errors=True)


def swap_in(new: PathLike, path: PathLike) -> None:
    """Rename the folder ``new`` to ``path``; an existing ``path`` is moved aside first, then
    deleted. Should the second rename fail, the old folder is put back."""
    new, path = Path(new), Path(path)
    old = None
    if path.exists():
        old = _sibling(path, OLD)
        os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        if old is not None and not path.exists():
            os.rename(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(path: PathLike) -> Iterator[Path]:
    """Yield an empty hidden sibling folder of ``path``; when the block completes, it becomes
    ``path`` (:func:`swap_in`, replacing an existing one). When the block raises, the sibling is
    deleted and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, PARTIAL)
    tmp.mkdir()
    try:
        yield tmp
        swap_in(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
