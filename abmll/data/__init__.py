"""Data layer: tasks (MetaICL jsonl and the built-in ``tiny`` set), split definitions, the
paper's multiple-choice prompt, support/query sampling, and the offline benchmark builder."""

from .examples import MCExample, SplitTasks
from .prompt import (
    IGNORE_INDEX,
    OPTION_LETTERS,
    collate_mc,
    format_prompt,
    option_token_ids,
    tokenize_example,
)
from .sampling import TaskSampler, summarize_prompt_lengths
from .splits import known_splits, load_split, task_lists_sha256

__all__ = [
    "IGNORE_INDEX",
    "OPTION_LETTERS",
    "MCExample",
    "SplitTasks",
    "TaskSampler",
    "collate_mc",
    "format_prompt",
    "known_splits",
    "load_split",
    "task_lists_sha256",
    "option_token_ids",
    "summarize_prompt_lengths",
    "tokenize_example",
]
