"""Parameter and module names that do not depend on activation checkpointing.

``training.set_activation_checkpointing`` wraps each layer in a ``CheckpointWrapper``, which
inserts ``_checkpoint_wrapped_module.`` into every name below it that ``named_modules`` or
``named_parameters`` reports from the model. torchtune's own recipes never see it, because
they read adapter weights from ``model.state_dict()``, whose post-hook strips the prefix. We
key adapters by ``named_modules`` (to hold the live parameters), so we strip it ourselves,
here and only here: the checkpoint, the resume and the PEFT export all use these names.
"""

from __future__ import annotations

from typing import Dict

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torchtune.modules.peft import get_adapter_params

__all__ = ["clean_name", "named_adapter_params"]


def clean_name(name: str) -> str:
    """``layers.0._checkpoint_wrapped_module.attn.q_proj`` -> ``layers.0.attn.q_proj``."""
    return name.replace(_CHECKPOINT_PREFIX, "")


def named_adapter_params(model: nn.Module) -> Dict[str, nn.Parameter]:
    """torchtune's ``get_adapter_params`` under clean names (the parameters themselves)."""
    return {clean_name(k): p for k, p in get_adapter_params(model).items()}

