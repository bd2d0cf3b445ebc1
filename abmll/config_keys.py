"""The config keys the recipe reads, and the check that refuses any other.

OmegaConf accepts any ``key=value`` override, so a typo (``eval.num_sample=10``) would run
another experiment than the one asked for and be recorded in ``results.json`` as if it meant
something. :func:`check_config_keys` refuses a key the recipe does not read, in one line naming
it and the closest known key. The sections with a ``_component_`` (model, tokenizer,
checkpointer, learner, metric_logger) are checked by their component's own signature, where
:func:`abmll.config_registry.instantiate` names the closest parameter.
"""

from __future__ import annotations

import difflib
from typing import Any, Dict, FrozenSet, Iterable, Mapping, Optional

__all__ = ["RECIPE_KEYS", "COMPONENT_SECTIONS", "check_config_keys", "closest", "unknown_key_message"]

#: Sections built from a ``_component_``: their keys are the component's arguments.
COMPONENT_SECTIONS: FrozenSet[str] = frozenset({"model", "tokenizer", "checkpointer", "learner", "metric_logger"})

#: Every key the recipe reads, by section ("" is the top level). What each does: README, "Config keys".
RECIPE_KEYS: Dict[str, FrozenSet[str]] = {
    "": frozenset({
        "output_dir", "seed", "device", "dtype", "split", "epochs", "stop_after_epoch",
        "resume_from_checkpoint", "overwrite", "log_every_n_steps", "max_steps_per_epoch",
        "enable_activation_checkpointing", "debug_check_replicas", "base_model_name_or_path",
        "c_relative_std", "compile",
        "data", "eval", *COMPONENT_SECTIONS,
    }),
    "data": frozenset({
        "data_dir", "split_file", "k", "seed", "batch_size", "eval_batch_size", "max_seq_len",
        "chat_template", "max_eval_examples_per_task", "num_demonstrations",
    }),
    "eval": frozenset({
        "every_n_epochs", "validate", "num_samples", "mode", "ece_bins", "prune_fractions",
        "flip_rate", "temperature_scaling", "save_predictions",
    }),
}


def closest(key: str, known: Iterable[str]) -> Optional[str]:
    """The known name nearest to ``key`` (difflib's ratio), or None if nothing is near."""
    found = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.5)
    return found[0] if found else None


def unknown_key_message(path: str, known: Iterable[str], where: str) -> str:
    """``config key 'eval.num_sample' is not read by ...; did you mean 'eval.num_samples'?``"""
    prefix, _, key = path.rpartition(".")
    near = closest(key, known)
    hint = f"; did you mean '{prefix + '.' if prefix else ''}{near}'?" if near else ""
    return f"config key '{path}' is not read by {where}{hint} (known: {', '.join(sorted(known))})"


def check_config_keys(cfg: Mapping[str, Any], where: str = "abmll_recipe") -> None:
    """Raise ``ValueError`` naming the first key the recipe does not read (and the closest one).

    A section that should be a mapping (``data``, ``eval``) but is something else is refused too.
    """
    for section, known in RECIPE_KEYS.items():
        node = cfg if section == "" else cfg.get(section, None)
        if node is None:
            continue
        if not isinstance(node, Mapping):
            raise ValueError(f"config key '{section}' must be a mapping of keys, got {node!r}")
        for key in node:
            if key not in known:
                path = f"{section}.{key}" if section else str(key)
                raise ValueError(unknown_key_message(path, known, where))
