"""FLOPs of the real graph, as PyTorch's ``FlopCounterMode`` counts them (matmuls and attention).

Shared by the benchmark (``scripts/benchmark.py``: the FLOP floor of ABMLL against Regular LoRA,
:mod:`abmll.benchmark.measure`) and the full-scale prediction (:mod:`abmll.benchmark.predict`).

``FlopCounterMode`` counts the ops that have a FLOP formula: ``mm``, ``addmm``, ``bmm``,
``baddbmm``, convolutions and attention, forward and backward, recomputation included (what
``torch.utils.checkpoint`` reruns in the backward is dispatched again and counted again).
Elementwise work (``exp``, ``randn``, ``mul``) has no formula and is not counted.

The CPU's attention kernel (``_scaled_dot_product_flash_attention_for_cpu``) is the same
algorithm as CUDA's flash attention; ``FlopCounterMode`` has no formula for the CPU kernel, so
the CUDA one is registered for it.

Count in an episode of its own, never inside a timed or memory-measured one: the counter's
module hooks keep every module's output alive for backward.
"""

from __future__ import annotations

from typing import Any, Callable


def flop_counter():
    """A ``FlopCounterMode`` (no display) that also counts the CPU flash-attention kernel."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten

    def same_as(cuda_op):
        # The registry's formulas already take tensors; `_get_raw` says not to wrap them again.
        registered = fc.flop_registry[cuda_op]

        def formula(*args, **kwargs):
            return registered(*args, **kwargs)

        formula._get_raw = True
        return formula

    return fc.FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: same_as(aten._scaled_dot_product_flash_attention),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            same_as(aten._scaled_dot_product_flash_attention_backward),
    })


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """The FLOPs of ``fn(*args, **kwargs)`` (whatever backward it runs included)."""
    with flop_counter() as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())
