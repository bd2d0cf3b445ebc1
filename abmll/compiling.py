"""``compile: true`` (the recipe) and ``--compile`` (the benchmark): ``torch.compile`` the model
the way torchtune's recipes do, each transformer layer in place.

Two settings go with it, for the whole process:

* ``torch._inductor.config.fallback_random``: the Gaussian layers draw their noise from the
  global generator (``abmll.modules.gaussian_lora``). Inductor would replace those draws by its
  own generator's, giving other numbers than eager from the same seed (measured on the tiny
  ABMLL: test NLL 1.7e-4 apart instead of 5e-7); with eager's random ops ``compile: true``
  computes the run ``compile: false`` computes, up to floating-point rounding, and a run may be
  resumed with the option changed.
* ``torch._dynamo.config.recompile_limit`` raised to :data:`RECOMPILE_LIMIT`: one layer's
  ``forward`` is one code object, and a run compiles it once per variant: the first layer (its
  input needs no gradient) and the others, gradients on and off, training and evaluation
  shapes, Gaussian ``sample`` and ``mean`` mode, and with ``model.sampling: weight`` each
  projection shape. The tiny ABMLL reaches torchtune's default limit (8) in one short epoch;
  past it dynamo would silently run the new variants eagerly.
"""

from __future__ import annotations

from torch import nn

__all__ = ["RECOMPILE_LIMIT", "compile_model", "compile_module"]

#: Compiled variants kept per code object (torch's default: 8).
RECOMPILE_LIMIT = 64


def _configure() -> None:
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)


def compile_model(model: nn.Module, verbose: bool = True) -> None:
    """``torchtune.training.compile_model``: ``layer.compile()`` for every transformer layer
    (inside an activation-checkpointing wrapper too), after :func:`_configure`. The first calls
    compile; later ones reuse the graphs."""
    from torchtune import training

    _configure()
    training.compile_model(model, verbose=verbose)


def compile_module(module: nn.Module) -> None:
    """``module.compile()`` in place, with the same settings (the benchmark's single layers)."""
    import os

    _configure()
    module.compile(backend=os.environ.get("TORCH_COMPILE_BACKEND", "inductor"))
