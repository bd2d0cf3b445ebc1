"""Memory probes used while an episode runs: peak RSS of this process and the bytes autograd
holds saved for backward.

* ``RssSampler``: peak resident set size, sampled every 2 ms from /proc/self/statm.
* ``SavedTensorMeter``: the largest number of bytes autograd held saved for backward at once
  (unique storages, parameters excluded, each from when autograd saves it until autograd frees
  it), to be used with ``torch.autograd.graph.saved_tensors_hooks``. (Under activation
  checkpointing, tensors saved inside a checkpointed block are held by the checkpoint, not
  counted here.)
"""

from __future__ import annotations

import os
import resource
import threading
import time
from typing import Dict

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssSampler:
    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


class _Packed:
    """What autograd stores in place of a saved tensor while ``SavedTensorMeter`` is active:
    a detached alias of the tensor (the same storage; no reference back to the graph, so no
    reference cycle through a saved output), and the release of its count when autograd frees
    it. First-order gradients only (the alias has no grad_fn)."""

    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor, meter, key):
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self):
        if self.key is not None:
            self.meter._release(self.key)


class SavedTensorMeter:
    """Largest total of unique non-parameter storages saved for backward and alive at once.

    Each saved tensor is counted from when autograd saves it until autograd frees it (its graph
    is freed by ``backward`` or dropped), so tensors of a finished step are never counted in a
    later one.
    """

    def __init__(self, model, params):
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self.live: Dict[int, list] = {}  # storage ptr -> [bytes, references]
        self.current = 0
        self.peak = 0

    def pack(self, t):
        alias = t.detach()
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
        except (RuntimeError, NotImplementedError):
            return _Packed(alias, self, None)
        if ptr in self.param_ptrs:
            return _Packed(alias, self, None)
        entry = self.live.get(ptr)
        if entry is None:
            self.live[ptr] = [st.nbytes(), 1]
            self.current += st.nbytes()
            self.peak = max(self.peak, self.current)
        else:
            entry[1] += 1
        return _Packed(alias, self, ptr)

    def _release(self, ptr):
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    @staticmethod
    def unpack(packed):
        return packed.tensor

    def close(self):
        pass
