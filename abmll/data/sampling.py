"""Seeded support/query sampling over tasks (no global RNG), and the in-context demonstrations
each example's prompt carries (``data.num_demonstrations``)."""

from __future__ import annotations

import logging
import random

import torch

from .examples import MCExample
from .prompt import collate_mc, tokenize_example

__all__ = ["DEMONSTRATION_POOLS", "TaskSampler", "summarize_prompt_lengths"]

log = logging.getLogger(__name__)

#: Where an example's demonstrations come from (``TaskSampler(demonstration_pool=...)``):
#: ``"task"``: every other example of its task (a training task: its training file);
#: ``"support"``: the task's support examples, the labelled few-shot set that test-time
#: adaptation is given (an unseen task; :meth:`TaskSampler.adaptation_split` chooses them).
DEMONSTRATION_POOLS = ("task", "support")
_SUPPORT_POOL = "its support examples: learner.inner_steps x data.batch_size"


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


def _count(value) -> int:
    """``data.num_demonstrations`` as an int >= 0 (a bool, a fraction or text is refused)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if not ok:
        raise ValueError(f"config key `data.num_demonstrations` must be an integer >= 0, got {value!r}")
    return int(value)


class TaskSampler:
    """Batches of tokenized examples per task, reproducible from ``seed``.

    Tokenization is lazy and cached per example. Batches are collated dicts (see
    :func:`abmll.data.collate_mc`) padded with ``tokenizer.pad_id`` (falls back to
    ``eos_id``, then 0, when the tokenizer has none).

    ``num_demonstrations`` k > 0: every prompt (support, query, pooled and evaluation batches
    alike) starts with k solved examples of its task, drawn from ``demonstration_pool``
    (:data:`DEMONSTRATION_POOLS`) by a generator keyed by (seed, task, example index): the same
    for every method within a seed. Never the example itself, nor one with the same question
    and choices (a duplicate would show the answer). For an unseen task the pool is its support
    examples, so a demonstration is never an example that is evaluated, and ICL uses no labels
    beyond those test-time adaptation is given.
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
        num_demonstrations: int = 0,
        demonstration_pool: str = "task",
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
        self.num_demonstrations = _count(num_demonstrations)
        if demonstration_pool not in DEMONSTRATION_POOLS:
            raise ValueError(f"demonstration_pool must be one of {DEMONSTRATION_POOLS}, got {demonstration_pool!r}")
        self.demonstration_pool = demonstration_pool
        self._pools: dict[str, list[int]] = {}  # "support" pools, set by adaptation_split
        self._questions: dict[str, dict[tuple, list[int]]] = {}  # per task: (input, options) -> indices
        self._splits: dict[str, tuple[list[int], list[int]]] = {}  # per task: (support, evaluated)
        self._dropped: dict[str, int] = {}  # per task: prompts that lost demonstrations to max_seq_len
        if demonstration_pool == "task":
            self.check_demonstration_pools(0)

    # -- helpers -----------------------------------------------------------------------------
    def _check_task(self, task: str) -> list[MCExample]:
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; known: {self.task_names}")
        return self.tasks[task]

    def tokenized(self, task: str, idx: int) -> dict:
        key = (task, idx)
        item = self._cache.get(key)
        if item is None:
            exs = self.tasks[task]
            demos = [exs[j] for j in self.demonstrations(task, idx)]
            item = tokenize_example(exs[idx], self.tokenizer, self.max_seq_len, self.chat_template, demos)
            if item["demonstrations"] < len(demos):
                self._note_dropped(task, len(demos) - item["demonstrations"], len(item["tokens"]))
            self._cache[key] = item
        return item

    # -- demonstrations ----------------------------------------------------------------------
    def _check_pool_size(self, task: str, pool_size: int, pool: str) -> None:
        """An example in the pool cannot be its own demonstration: k <= pool size - 1."""
        if self.num_demonstrations > pool_size - 1:
            raise ValueError(
                f"config key `data.num_demonstrations`={self.num_demonstrations} is more than task "
                f"{task!r} can give: its demonstration pool ({pool}) has {pool_size} examples, and an "
                f"example is never its own demonstration, so at most {max(pool_size - 1, 0)}"
            )

    def check_demonstration_pools(self, num_support: int) -> None:
        """Refuse, before anything runs, a ``num_demonstrations`` that a task's pool cannot
        give (``"support"`` pools: ``num_support`` batches of ``batch_size``)."""
        if not self.num_demonstrations:
            return
        for task, exs in self.tasks.items():
            if self.demonstration_pool == "task":
                self._check_pool_size(task, len(exs), "the task's examples")
            else:
                n = min(num_support * self.batch_size, len(exs))
                self._check_pool_size(task, n, _SUPPORT_POOL)

    def set_demonstration_pool(self, task: str, indices) -> None:
        """The examples of ``task`` its prompts take demonstrations from (``"support"`` pools:
        :meth:`adaptation_split` calls it; ``abmll adapt`` with a user's support rows).
        Prompts already tokenized with another pool are redone."""
        self._check_task(task)
        indices = [int(i) for i in indices]
        if self._pools.get(task) == indices:
            return
        self._check_pool_size(task, len(indices), _SUPPORT_POOL)
        self._pools[task] = indices
        self._cache = {k: v for k, v in self._cache.items() if k[0] != task}

    def _pool(self, task: str) -> list[int] | range:
        if self.demonstration_pool == "task":
            return range(len(self.tasks[task]))
        pool = self._pools.get(task)
        if pool is None:
            raise RuntimeError(
                f"task {task!r}: its demonstrations come from its support examples, which are not "
                f"chosen yet (call adaptation_split or set_demonstration_pool first)"
            )
        return pool

    def _same_question(self, task: str, idx: int) -> list[int]:
        """Indices of ``task``'s examples with ``idx``'s question and choices (``idx`` included)."""
        groups = self._questions.get(task)
        if groups is None:
            groups = {}
            for i, e in enumerate(self.tasks[task]):
                groups.setdefault((e.input, e.options), []).append(i)
            self._questions[task] = groups
        e = self.tasks[task][idx]
        return groups[(e.input, e.options)]

    def demonstrations(self, task: str, idx: int) -> list[int]:
        """Indices of the ``num_demonstrations`` examples whose solved prompts come before
        example ``idx``'s question, in prompt order (empty with k = 0)."""
        k = self.num_demonstrations
        if k == 0:
            return []
        pool = self._pool(task)
        same = set(self._same_question(task, idx))
        in_pool = len(same) if self.demonstration_pool == "task" else len(same.intersection(pool))
        if k > len(pool) - in_pool:
            raise ValueError(
                f"config key `data.num_demonstrations`={k} is more than task {task!r} can give to its "
                f"example {idx}: the demonstration pool has {len(pool)} examples, {in_pool} of them with "
                f"that example's question and choices (never shown as its demonstration)"
            )
        # A sample of k + in_pool distinct positions holds at least k outside `same`.
        rng = _rng(self.seed, "demonstrations", task, idx)
        picks = rng.sample(range(len(pool)), min(len(pool), k + in_pool))
        return [pool[p] for p in picks if pool[p] not in same][:k]

    def _note_dropped(self, task: str, n_dropped: int, n_tokens: int) -> None:
        """Count a prompt that lost demonstrations to ``max_seq_len``; log once per task."""
        self._dropped[task] = self._dropped.get(task, 0) + 1
        if self._dropped[task] == 1:
            log.warning(
                "task %s: a prompt with %d demonstrations is over max_seq_len=%d; whole demonstrations "
                "are dropped (here %d, leaving %d tokens) before the question is cut. Logged once per "
                "task and sampler; the test's count: results.json data.test_prompts",
                task, self.num_demonstrations, self.max_seq_len, n_dropped, n_tokens,
            )

    def dropped_demonstrations(self) -> dict[str, int]:
        """Per task, how many of the prompts tokenized so far lost demonstrations."""
        return dict(self._dropped)

    def prompt_lengths(self) -> dict[str, dict[str, list[int]]]:
        """Per task split by :meth:`adaptation_split`: the token count and the number of
        demonstrations of each ``support`` and ``evaluated`` prompt (what a test costs)."""
        out = {}
        for task, (support, evaluated) in self._splits.items():
            out[task] = {}
            for part, indices in (("support", support), ("evaluated", evaluated)):
                items = [self.tokenized(task, i) for i in indices]
                out[task][part] = [len(it["tokens"]) for it in items]
                out[task][f"{part}_demonstrations"] = [it["demonstrations"] for it in items]
        return out

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
        if self.num_demonstrations and self.demonstration_pool == "support":
            # The labelled few-shot set is also the demonstration pool: an evaluated example's
            # demonstrations are support examples, never another evaluated (or test) example.
            self.set_demonstration_pool(task, support)
        self._splits[task] = (support, rest)
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


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def summarize_prompt_lengths(per_task: dict[str, dict[str, list[int]]], num_demonstrations: int) -> dict:
    """What the prompts of a test cost, from :meth:`TaskSampler.prompt_lengths` (the tasks of
    every process merged): tokens per evaluated and per support prompt (means over all prompts,
    not over tasks), the demonstrations they kept, and how many lost some to ``max_seq_len``."""
    def pooled(key):
        return [v for t in per_task.values() for v in t[key]]

    kept = pooled("evaluated_demonstrations") + pooled("support_demonstrations")
    return {
        "evaluated_prompts": len(pooled("evaluated")),
        "tokens_per_evaluated_prompt": _mean(pooled("evaluated")),
        "support_prompts": len(pooled("support")),
        "tokens_per_support_prompt": _mean(pooled("support")),
        "demonstrations_per_evaluated_prompt": _mean(pooled("evaluated_demonstrations")),
        "prompts_with_dropped_demonstrations": sum(d < num_demonstrations for d in kept),
        "tokens_per_evaluated_prompt_per_task": {t: _mean(v["evaluated"]) for t, v in per_task.items()},
    }
