"""The thin parallel layer: one process per device, different tasks per process, one θ.

``tune run --nproc_per_node N abmll_recipe ...`` (torchrun) starts N copies of the recipe. Each
copy runs the inner loops of its own share of a meta-batch's tasks; the learners sum their
outer gradients (Reptile: their moves) with :meth:`Replicas.all_reduce_sum_`, so every process
takes the same step and θ stays identical everywhere. With one process every method here is
the identity, and the recipe behaves exactly as without this module.

Collectives are the standard ``torch.distributed`` ones: NCCL on GPUs, gloo on CPUs (the
backend torchtune's own distributed recipes pick). What crosses processes is small: the
adapters' gradients once per meta-step, metrics, and per-task evaluation results.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
from typing import Any, Dict, Iterator, List, Sequence, TypeVar

import torch
import torch.distributed as dist
from torchtune import training

__all__ = ["Replicas", "LOCAL", "seeded", "seed_of"]

T = TypeVar("T")


class Replicas:
    """This process's place among the processes of a run (rank, world size) and the few
    collectives the recipe and the learners need."""

    def __init__(self, world_size: int = 1, rank: int = 0):
        self.world_size = int(world_size)
        self.rank = int(rank)

    @classmethod
    def from_environment(cls, device: torch.device, timeout_s: float = 1800.0) -> "Replicas":
        """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK,
        MASTER_ADDR, ...); a plain ``tune run`` is a group of one and joins nothing.

        ``timeout_s`` bounds every collective: a process whose peer died waits at most this
        long before failing (torchrun also stops the other workers as soon as one exits with an
        error, which is what normally ends such a run).
        """
        if not training.is_distributed():
            return cls()
        if not dist.is_initialized():
            dist.init_process_group(
                backend=training.get_distributed_backend(device.type),
                timeout=datetime.timedelta(seconds=timeout_s),
            )
        return cls(dist.get_world_size(), dist.get_rank())

    @property
    def is_main(self) -> bool:
        """The process that writes: results.json, checkpoints, exports, metric logs."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> List[T]:
        """This process's share of ``items``: every world_size-th, starting at its rank."""
        return list(items[self.rank :: self.world_size])

    # --- collectives (identity for one process) ------------------------------------------------
    def all_reduce_sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum each tensor over processes, in place, with one collective (flattened)."""
        if self.world_size == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n

    def broadcast_(self, tensors: Sequence[torch.Tensor], src: int = 0) -> None:
        """Overwrite each tensor with process ``src``'s, in place."""
        if self.world_size == 1:
            return
        for t in tensors:
            dist.broadcast(t, src=src)

    def all_gather(self, obj: Any) -> List[Any]:
        """Every process's ``obj``, in rank order (a picklable object)."""
        if self.world_size == 1:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def sum_metrics(self, sums: Dict[str, float]) -> Dict[str, float]:
        """Per-key sums over processes (a process without episodes contributes nothing)."""
        total: Dict[str, float] = {}
        for part in self.all_gather(sums):
            for k, v in part.items():
                total[k] = total.get(k, 0.0) + v
        return total

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def check_identical(self, named: Dict[str, torch.Tensor], what: str) -> None:
        """Raise if any tensor differs between processes (a debugging check: one all-gather
        of a checksum per tensor)."""
        if self.world_size == 1:
            return
        sums = {k: float(v.detach().double().sum()) for k, v in named.items()}
        for rank, other in enumerate(self.all_gather(sums)):
            bad = [k for k in sums if other.get(k) != sums[k]]
            if bad:
                raise RuntimeError(
                    f"{what}: process {rank} holds different values than process {self.rank} "
                    f"for {bad[0]!r} ({len(bad)} tensors differ)"
                )

    def shutdown(self) -> None:
        """Barrier, then leave the group (gloo can hang at exit otherwise)."""
        if dist.is_available() and dist.is_initialized():
            if self.world_size > 1:
                dist.barrier()
            gc.collect()
            dist.destroy_process_group()


LOCAL = Replicas()  # one process: every collective is the identity


def seed_of(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (the same on every process and every run)."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run the body with torch's RNG seeded to ``seed``, restoring the outer RNG after it, so
    the body draws the same noise whichever process runs it and whatever ran before. ``None``:
    the body uses the running RNG (one process, meta-batch 1: the paper's setting)."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
