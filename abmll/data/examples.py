"""Core data types: one multiple-choice example and one split of tasks."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["MCExample", "SplitTasks"]


@dataclass(frozen=True)
class MCExample:
    """One multiple-choice example (MetaICL fields).

    ``options`` holds 2-4 answer strings (lists are converted to tuples);
    ``output`` must be one of them. ``label`` is the index of ``output``. ``line``: the
    1-based line of the task file it was read from (None for built-in tasks); it is not part
    of the example's identity (two equal examples from different lines compare equal).
    """

    task: str
    input: str
    options: tuple[str, ...]
    output: str
    line: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.options, tuple):
            object.__setattr__(self, "options", tuple(self.options))
        if self.output not in self.options:
            raise ValueError(
                f"task {self.task!r}: output {self.output!r} is not among options {list(self.options)}"
            )

    @property
    def label(self) -> int:
        return self.options.index(self.output)


@dataclass
class SplitTasks:
    """Tasks of one split: meta-training tasks, and unseen tasks' validation / test examples."""

    name: str
    train: dict[str, list[MCExample]]
    val: dict[str, list[MCExample]]
    test: dict[str, list[MCExample]]
    # Per-file load report (filled for on-disk splits; empty for the built-in tiny split).
    report: list = field(default_factory=list, repr=False)
