"""Gaussian-LoRA builders for the paper's model family, from torchtune's own builders.

Every builder takes ``sampling`` (the config's ``model.sampling``: ``local`` | ``weight``), the
training-time estimator of every Gaussian layer (:func:`abmll.models.add_gaussian_lora`).

Plain-LoRA variants for the baselines are torchtune's (``torchtune.models.llama3.lora_llama3_8b``
and friends); configs point at them directly.
"""

from __future__ import annotations

from typing import Sequence

from torchtune.models.llama3 import llama3_8b
from torchtune.models.llama3_1 import llama3_1_8b
from torchtune.models.llama3_2 import llama3_2_1b, llama3_2_3b
from torchtune.models.qwen2 import qwen2_7b
from torchtune.modules import TransformerDecoder

from abmll.models._gaussian import DEFAULT_LORA_ATTN_MODULES, add_gaussian_lora, check_sampling
from abmll.modules import DEFAULT_C, DEFAULT_SAMPLING

_DEFAULT = tuple(DEFAULT_LORA_ATTN_MODULES)


def gaussian_lora_llama3_8b(
    lora_attn_modules: Sequence[str] = _DEFAULT,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    c: float = DEFAULT_C,
    sampling: str = DEFAULT_SAMPLING,
) -> TransformerDecoder:
    """Llama3-8B (the paper's model) with Gaussian LoRA on q/v/output by default."""
    check_sampling(sampling)
    return add_gaussian_lora(llama3_8b(), lora_attn_modules, lora_rank, lora_alpha, c, sampling)


def gaussian_lora_llama3_1_8b(
    lora_attn_modules: Sequence[str] = _DEFAULT,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    c: float = DEFAULT_C,
    sampling: str = DEFAULT_SAMPLING,
) -> TransformerDecoder:
    check_sampling(sampling)
    return add_gaussian_lora(llama3_1_8b(), lora_attn_modules, lora_rank, lora_alpha, c, sampling)


def gaussian_lora_llama3_2_1b(
    lora_attn_modules: Sequence[str] = _DEFAULT,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    c: float = DEFAULT_C,
    sampling: str = DEFAULT_SAMPLING,
) -> TransformerDecoder:
    check_sampling(sampling)
    return add_gaussian_lora(llama3_2_1b(), lora_attn_modules, lora_rank, lora_alpha, c, sampling)


def gaussian_lora_llama3_2_3b(
    lora_attn_modules: Sequence[str] = _DEFAULT,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    c: float = DEFAULT_C,
    sampling: str = DEFAULT_SAMPLING,
) -> TransformerDecoder:
    check_sampling(sampling)
    return add_gaussian_lora(llama3_2_3b(), lora_attn_modules, lora_rank, lora_alpha, c, sampling)


def gaussian_lora_qwen2_7b(
    lora_attn_modules: Sequence[str] = _DEFAULT,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    c: float = DEFAULT_C,
    sampling: str = DEFAULT_SAMPLING,
) -> TransformerDecoder:
    """Qwen2-7B; its q/k/v projections carry a bias, which stays frozen."""
    check_sampling(sampling)
    return add_gaussian_lora(qwen2_7b(), lora_attn_modules, lora_rank, lora_alpha, c, sampling)
