"""Export an adapter as a standard LoRA in PEFT's format (what `PeftModel.from_pretrained` loads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors.torch import save_file
from torch import nn
from torchtune.models.convert_weights import (
    tune_to_peft_adapter_config,
    tune_to_peft_adapter_weights,
)
from torchtune.models.qwen2._positional_embeddings import Qwen2RotaryPositionalEmbeddings
from torchtune.modules import MultiHeadAttention

from abmll.atomic import atomic_write, atomic_write_text
from abmll.modules.names import clean_name


def save_peft_adapter(
    adapter: Dict[str, torch.Tensor],
    model: nn.Module,
    out_dir: Path,
    rank: Optional[int] = None,
    alpha: Optional[float] = None,
    base_model_name_or_path: Optional[str] = None,
) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` to ``out_dir``.

    ``adapter`` uses torchtune names (``layers.0.attn.q_proj.lora_a.weight``); torchtune's
    converter maps them to Hugging Face names and permutes the q/k ``lora_B`` rows into
    Hugging Face's rotary layout, using the attention shape read off ``model``. ``rank`` and
    ``alpha`` default to those of the model's (first) LoRA layer.

    The permutation is right only for models whose base weights torchtune permutes on loading
    from Hugging Face (Llama's interleaved RoPE). Qwen2's RoPE already uses Hugging Face's
    layout (torchtune's ``qwen2_hf_to_tune`` copies q/k unchanged), so for a Qwen2 model the
    rows are left as they are: the converter's permutation is undone before it is applied.
    (torchtune 0.6.1's own ``FullModelHFCheckpointer`` permutes Qwen2 adapters too, which
    gives Hugging Face a wrong q/k ``lora_B``.)
    """
    if rank is None or alpha is None:
        layer = next(m for m in model.modules() if hasattr(m, "rank") and hasattr(m, "alpha"))
        rank = layer.rank if rank is None else rank
        alpha = layer.alpha if alpha is None else alpha
    # torchtune's converter knows only unwrapped names: accept names read off a model under
    # activation checkpointing too (abmll.modules.names).
    adapter = {clean_name(k): v for k, v in adapter.items()}
    attn = next(m for m in model.modules() if isinstance(m, MultiHeadAttention))
    if _hf_rope_layout(attn):
        adapter = _unpermute_qk_lora_b(adapter, attn)
    weights = tune_to_peft_adapter_weights(
        adapter,
        num_heads=attn.num_heads,
        num_kv_heads=attn.num_kv_heads,
        dim=attn.embed_dim,
        head_dim=attn.head_dim,
    )
    targets = sorted({k.split(".")[-3] for k in adapter})
    config = tune_to_peft_adapter_config(
        {"r": rank, "lora_alpha": alpha, "target_modules": targets},
        base_model_name_or_path=base_model_name_or_path,
    )
    config.update({"peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none"})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    atomic_write(out_dir / "adapter_model.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_text(out_dir / "adapter_config.json", json.dumps(config, indent=2))


#: torchtune RoPE modules that rotate halves of the head (Hugging Face's layout), so that the
#: model's q/k weights are Hugging Face's unpermuted.
_HF_LAYOUT_ROPE = (Qwen2RotaryPositionalEmbeddings,)


def _hf_rope_layout(attn: MultiHeadAttention) -> bool:
    return isinstance(getattr(attn, "pos_embeddings", None), _HF_LAYOUT_ROPE)


def _unpermute_qk_lora_b(adapter: Dict[str, torch.Tensor], attn: MultiHeadAttention) -> Dict[str, torch.Tensor]:
    """The q/k ``lora_b`` rows in the order that ``tune_to_peft_adapter_weights``'s permutation
    (``view(h, d/2, 2, r).transpose(1, 2)``) maps back to the given order."""
    head_dim = attn.head_dim

    def inverse(t: torch.Tensor, n_heads: int) -> torch.Tensor:
        rank = t.shape[-1]
        return t.view(n_heads, 2, head_dim // 2, rank).transpose(1, 2).reshape(head_dim * n_heads, rank)

    out = {}
    for key, value in adapter.items():
        if key.endswith("q_proj.lora_b.weight"):
            value = inverse(value, attn.num_heads)
        elif key.endswith("k_proj.lora_b.weight"):
            value = inverse(value, attn.num_kv_heads)
        out[key] = value
    return out
