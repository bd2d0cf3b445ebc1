"""The compute dtype: ``dtype: auto`` chosen from the hardware, and what a run records of it.

bf16 halves the frozen model's memory and, where the hardware computes it natively, its
matmul time. Where it does not, it is slow: on an AVX2-only x86 CPU (AMD Zen 3, most laptops)
torch runs a bf16 matmul ~9x slower than fp32 (SmolLM2's 512x576 @ 576x1536: 161.7 ms against
17.8 ms, one thread, torch 2.13.0). So ``dtype: auto`` (the SmolLM2 configs' default) chooses

* on CUDA: bf16 where the device supports it (torchtune's ``verify_bf16_support``), else fp32;
* on the CPU: bf16 where the CPU has native bf16 instructions (AVX512_BF16 or AMX, as torch
  reports them), else where a one-off probe finds a bf16 matmul no slower than fp32 (e.g. an
  Arm CPU with bf16), else fp32.

An explicit ``dtype: bf16`` runs as asked; on a CPU without native bf16 it warns once with the
slowdown the probe measured. Every run records what was chosen and why
(:meth:`Precision.record`, ``results.json``'s ``precision``), with the CPU capability and the
thread count, so that runs of different dtypes are never pooled unseen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch

__all__ = ["Precision", "resolve_precision", "cpu_native_bf16", "bf16_matmul_slowdown", "dtype_name"]

#: Names a config's ``dtype`` may take: ``auto`` and torchtune's precision strings.
AUTO = "auto"
_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (torchtune's spelling, as in the configs)."""
    return _NAMES.get(dtype, str(dtype).replace("torch.", ""))


def cpu_capability() -> str:
    """torch's CPU kernel level (``AVX2``, ``AVX512``, ``DEFAULT``, ...), as the README names it."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_native_bf16() -> Optional[str]:
    """The native bf16 instruction set this CPU has (``"AMX"`` or ``"AVX512_BF16"``), or None.

    torch's CPU capability string says ``AVX512`` whether or not the bf16 extension is there,
    so this asks torch's finer feature checks (private, hence looked up defensively)."""
    for label, check in (("AMX", "_is_amx_tile_supported"), ("AVX512_BF16", "_is_avx512_bf16_supported")):
        fn = getattr(torch.cpu, check, None)
        try:
            if fn is not None and fn():
                return label
        except Exception:  # noqa: BLE001 - a feature check must never stop a run
            continue
    return None


def bf16_matmul_slowdown(rows: int = 128, d_in: int = 576, d_out: int = 1536, repeats: int = 3) -> float:
    """Time of one CPU matmul in bf16 over its time in fp32 (best of ``repeats`` each).

    The shape is a slice of SmolLM2-135M's MLP (576 -> 1536). About 50 ms on an AVX2 CPU,
    where the answer is ~9."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d_in, generator=gen)
    w = torch.randn(d_in, d_out, generator=gen)

    def best(a: torch.Tensor, b: torch.Tensor) -> float:
        a @ b  # warm-up: first-call dispatch and allocation
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(x.bfloat16(), w.bfloat16()) / best(x, w)


@dataclass(frozen=True)
class Precision:
    """The compute dtype a run uses, what was asked for, and why."""

    dtype: torch.dtype
    requested: str  # the config's value: "auto", "bf16", "fp32", ...
    reason: str  # one clause: why this dtype
    device: str  # "cpu", "cuda", ...
    cpu_capability: str  # torch.backends.cpu.get_cpu_capability()
    cpu_native_bf16: Optional[str]  # "AMX" | "AVX512_BF16" | None (CPU runs)
    bf16_slowdown: Optional[float]  # the probe's bf16 / fp32 matmul time, where measured
    threads: int  # torch.get_num_threads()

    @property
    def name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def slow_bf16(self) -> bool:
        """bf16 chosen on a CPU that computes it slower than fp32 (an explicit ``dtype: bf16``)."""
        return self.dtype == torch.bfloat16 and self.bf16_slowdown is not None and self.bf16_slowdown > 1.0

    def describe(self) -> str:
        """The log line: what was chosen and why."""
        return f"compute dtype {self.name} (dtype: {self.requested}): {self.reason}"

    def record(self) -> Dict[str, Any]:
        """What ``results.json`` keeps (``precision``)."""
        return {
            "dtype": self.name,
            "requested": self.requested,
            "reason": self.reason,
            "device": self.device,
            "cpu_capability": self.cpu_capability,
            "cpu_native_bf16": self.cpu_native_bf16,
            "bf16_slowdown": None if self.bf16_slowdown is None else round(self.bf16_slowdown, 2),
            "threads": self.threads,
        }

    def slow_bf16_warning(self) -> str:
        return (
            f"dtype: bf16 on a CPU without native bf16 ({self.cpu_capability}, no AVX512_BF16 or AMX): "
            f"a bf16 matmul measured {self.bf16_slowdown:.1f}x slower than fp32 here, so this run will be "
            f"several times slower than in fp32; dtype=auto chooses fp32 on this CPU"
        )


def resolve_precision(
    requested: Any,
    device: torch.device,
    *,
    probe: Callable[[], float] = bf16_matmul_slowdown,
    cuda_bf16: Optional[Callable[[], bool]] = None,
) -> Precision:
    """The compute dtype for the config value ``requested`` on ``device``.

    ``probe`` (bf16 / fp32 matmul time on the CPU) runs only where the CPU reports no native
    bf16 and bf16 is asked for or ``auto`` must decide. ``cuda_bf16`` defaults to torchtune's
    ``verify_bf16_support``. Raises ``ValueError`` naming the ``dtype`` key for an unknown value
    (or bf16 asked for on a CUDA device without it, as torchtune does).
    """
    from torchtune import training
    from torchtune.training import precision as tt_precision

    requested = str(requested)
    capability = cpu_capability()
    native = cpu_native_bf16() if device.type == "cpu" else None
    common = dict(
        requested=requested, device=device.type, cpu_capability=capability, cpu_native_bf16=native,
        threads=torch.get_num_threads(),
    )
    if requested != AUTO:
        try:
            dtype = training.get_dtype(requested, device=device)
        except (ValueError, RuntimeError) as err:
            raise ValueError(f"dtype: {err} (or dtype=auto: bf16 where the hardware computes it natively)") from None
        slowdown = None
        if dtype == torch.bfloat16 and device.type == "cpu" and native is None:
            slowdown = probe()
        return Precision(dtype=dtype, reason="as configured", bf16_slowdown=slowdown, **common)

    if device.type == "cuda":
        supported = (cuda_bf16 or tt_precision.verify_bf16_support)()
        if supported:
            return Precision(dtype=torch.bfloat16, reason="the CUDA device supports bf16", bf16_slowdown=None, **common)
        return Precision(dtype=torch.float32, reason="the CUDA device does not support bf16", bf16_slowdown=None, **common)
    if device.type != "cpu":
        return Precision(dtype=torch.float32, reason=f"auto chooses fp32 on {device.type}", bf16_slowdown=None, **common)
    if native is not None:
        return Precision(dtype=torch.bfloat16, reason=f"the CPU has native bf16 ({native})", bf16_slowdown=None, **common)
    slowdown = probe()
    if slowdown <= 1.0:
        return Precision(
            dtype=torch.bfloat16, bf16_slowdown=slowdown,
            reason=f"no AVX512_BF16 or AMX, but a bf16 matmul measured {slowdown:.2f}x fp32's time here",
            **common,
        )
    return Precision(
        dtype=torch.float32, bf16_slowdown=slowdown,
        reason=f"the CPU has no native bf16 ({capability}, no AVX512_BF16 or AMX): a bf16 matmul "
        f"measured {slowdown:.1f}x slower than fp32 here",
        **common,
    )
