"""Seeded support/query sampling over tasks (no global RNG)."""

from __future__ import annotations

import random

import torch

from .examples import MCExample
from .prompt import collate_mc, tokenize_example

__all__ = ["TaskSampler"]


def _rng(*parts) -> random.Random:
    # str seeds are hashed with SHA-512 by `random` (independent of PYTHONHASHSEED).
    return random.Random("|".join(str(p) for p in parts))


def _draw(rng: random.Random, n_items: int, n: int) -> list[int]:
    """``n`` indices from ``range(n_items)``: without replacement while possible, then
    concatenated fresh permutations (every index used once before any is repeated)."""
    out: list[int] = []
    while len(out) < n:
        take = min(n - len(out), n_items)
        out.extend(rng.sample(range(n_items), take))
    return out


class TaskSampler:
    """Batches of tokenized examples per task, reproducible from ``seed``.

    Tokenization is lazy and cached per example. Batches are collated dicts (see
    :func:`abmll.data.collate_mc`) padded with ``tokenizer.pad_id`` (falls back to
    ``eos_id``, then 0, when the tokenizer has none).
    """

    def __init__(
        self,
        tasks: dict[str, list[MCExample]],
        tokenizer,
        *,
        batch_size: int,
        max_seq_len: int,
        seed: int,
        chat_template: bool = False,
        eval_batch_size: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
        empty = [t for t, exs in tasks.items() if not exs]
        if empty:
            raise ValueError(f"tasks with no examples: {empty}")
        self.tasks = tasks
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        # Evaluation needs no gradients, so it can take larger batches than training.
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.max_seq_len = int(max_seq_len)
        self.seed = seed
        self.chat_template = chat_template
        self.task_names: list[str] = list(tasks)
        pad = getattr(tokenizer, "pad_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_id", None)
        self.pad_id: int = 0 if pad is None else int(pad)
        self._cache: dict[tuple[str, int], dict] = {}

    # -- helpers -----------------------------------------------------------------------------
    def _check_task(self, task: str) -> list[MCExample]:
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; known: {self.task_names}")
        return self.tasks[task]

    def tokenized(self, task: str, idx: int) -> dict:
        key = (task, idx)
        item = self._cache.get(key)
        if item is None:
            item = tokenize_example(self.tasks[task][idx], self.tokenizer, self.max_seq_len, self.chat_template)
            self._cache[key] = item
        return item

    def _batches(self, pairs: list[tuple[str, int]], batch_size: int | None = None) -> list[dict]:
        bs = batch_size or self.batch_size
        batches = []
        for s in range(0, len(pairs), bs):
            chunk = pairs[s : s + bs]
            batch = collate_mc([self.tokenized(t, i) for t, i in chunk], self.pad_id)
            # Which examples these are (index among the task's examples): for the predictions file.
            batch["example"] = torch.tensor([i for _, i in chunk], dtype=torch.long)
            batches.append(batch)
        return batches

    # -- public ------------------------------------------------------------------------------
    def episode(self, task: str, epoch: int, num_support: int, num_query: int = 1) -> tuple[list[dict], list[dict]]:
        """``num_support`` support batches and ``num_query`` query batches for one meta-training
        step on ``task``. Examples are distinct within the episode when the task has enough of
        them; episodes differ across epochs (seeded by ``(seed, epoch, task)``)."""
        exs = self._check_task(task)
        n_s, n_q = num_support * self.batch_size, num_query * self.batch_size
        idx = _draw(_rng(self.seed, "episode", epoch, task), len(exs), n_s + n_q)
        pairs = [(task, i) for i in idx]
        return self._batches(pairs[:n_s]), self._batches(pairs[n_s:])

    def pooled_batches(self, epoch: int, num_batches: int) -> list[dict]:
        """``num_batches`` batches drawn from the union of all tasks, shuffled together."""
        pool = [(t, i) for t in self.task_names for i in range(len(self.tasks[t]))]
        idx = _draw(_rng(self.seed, "pooled", epoch), len(pool), num_batches * self.batch_size)
        return self._batches([pool[i] for i in idx])

    def adaptation_split(
        self, task: str, num_support: int, max_eval_examples: int | None
    ) -> tuple[list[dict], list[dict]]:
        """Test-time split of ``task``: ``num_support`` support batches for adaptation and the
        rest of the task (at most ``max_eval_examples``) as evaluation batches
        (:meth:`eval_batches`). Deterministic given ``seed`` (independent of the epoch); evaluation never
        sees a support example."""
        exs = self._check_task(task)
        n_s = num_support * self.batch_size
        if len(exs) < n_s + 1:
            raise ValueError(
                f"task {task!r} has {len(exs)} examples; test-time adaptation needs at least "
                f"{n_s + 1} ({num_support} support batches of {self.batch_size} plus one to evaluate)"
            )
        perm = _rng(self.seed, "adapt", task).sample(range(len(exs)), len(exs))
        support, rest = perm[:n_s], perm[n_s:]
        if max_eval_examples is not None:
            if int(max_eval_examples) < 1:
                raise ValueError(f"max_eval_examples must be >= 1 or None, got {max_eval_examples}")
            rest = rest[: int(max_eval_examples)]
        return self.batches(task, support), self.eval_batches(task, rest)

    def batches(self, task: str, indices: list[int]) -> list[dict]:
        """Training (support) batches of ``batch_size`` of ``task``'s examples ``indices``, in
        that order."""
        self._check_task(task)
        return self._batches([(task, i) for i in indices])

    def eval_batches(self, task: str, indices: list[int]) -> list[dict]:
        """Evaluation batches of ``eval_batch_size`` of ``task``'s examples ``indices``, grouped
        by length (a stable sort) so that little of a batch is padding: examples are
        right-padded and attention is causal, so padding does not change a prediction."""
        self._check_task(task)
        ordered = sorted(indices, key=lambda i: len(self.tokenized(task, i)["tokens"]))
        return self._batches([(task, i) for i in ordered], self.eval_batch_size)
