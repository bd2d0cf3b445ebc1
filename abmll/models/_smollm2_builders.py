"""SmolLM2-135M's architecture and its torchtune builders (plain, LoRA, Gaussian LoRA).

The model is torchtune's ``llama3_2`` with SmolLM2's sizes, plain RoPE (base 100000;
``scale_factor=1`` makes ``Llama3ScaledRoPE``'s cache bit-identical to plain RoPE) and the output
projection tied to the token embeddings. Weights come from ``SmolLM2Checkpointer``.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

from torchtune.models.llama3_2._component_builders import llama3_2, lora_llama3_2
from torchtune.modules import TransformerDecoder

from abmll.models._gaussian import DEFAULT_LORA_ATTN_MODULES, add_gaussian_lora, check_sampling
from abmll.modules import DEFAULT_C, DEFAULT_SAMPLING

#: SmolLM2-135M's architecture, as torchtune's ``llama3_2`` builder takes it.
SMOLLM2_135M_CONFIG: Dict[str, Any] = dict(
    vocab_size=49152,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    embed_dim=576,
    intermediate_dim=1536,
    max_seq_len=8192,
    rope_base=100_000,
    norm_eps=1e-5,
)


def smollm2_135m() -> TransformerDecoder:
    """SmolLM2-135M as a torchtune ``TransformerDecoder`` (random init; load weights with
    :class:`SmolLM2Checkpointer`). Output projection tied to the token embeddings."""
    return llama3_2(**SMOLLM2_135M_CONFIG, scale_factor=1, tie_word_embeddings=True)


def lora_smollm2_135m(
    lora_attn_modules: Sequence[str],
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
) -> TransformerDecoder:
    """SmolLM2-135M with torchtune's ``LoRALinear`` on the named attention projections.

    ``apply_lora_to_output`` must stay False: the output projection is tied to the embeddings.
    """
    return lora_llama3_2(
        list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        **SMOLLM2_135M_CONFIG,
        scale_factor=1,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        tie_word_embeddings=True,
    )


def gaussian_lora_smollm2_135m(
    lora_attn_modules: Sequence[str] = tuple(DEFAULT_LORA_ATTN_MODULES),
    lora_rank: int = 8,
    lora_alpha: float = 16,
    c: float = DEFAULT_C,
    sampling: str = DEFAULT_SAMPLING,
) -> TransformerDecoder:
    """SmolLM2-135M with ``GaussianLoRALinear`` (ABMLL) on the named attention projections;
    ``sampling`` (``model.sampling``): the training-time estimator, ``local`` or ``weight``.

    Base weights keep torchtune's key names, so ``SmolLM2Checkpointer``'s state dict loads with
    ``strict=False`` and only the adapter keys missing.
    """
    check_sampling(sampling)
    return add_gaussian_lora(
        smollm2_135m(),
        lora_attn_modules=lora_attn_modules,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        c=c,
        sampling=sampling,
    )
