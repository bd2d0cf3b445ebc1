"""Tiny random Llama3- and Qwen2-style models and a byte-level tokenizer, for tests and quick runs.

Nothing is downloaded: the model is randomly initialised from the seed, and the tokenizer
maps UTF-8 bytes to ids 0-255 plus a few special tokens. The option letters after a space
(" A" ... " D") are single tokens, as they are in real BPE vocabularies, so the answer of a
multiple-choice prompt is one token.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from torchtune.data import Message
from torchtune.models.llama3 import lora_llama3
from torchtune.models.llama3._component_builders import llama3
from torchtune.models.qwen2._component_builders import lora_qwen2, qwen2
from torchtune.modules import TransformerDecoder

from abmll.models._gaussian import DEFAULT_LORA_ATTN_MODULES, add_gaussian_lora, check_sampling
from abmll.modules import DEFAULT_C, DEFAULT_SAMPLING

_MERGED = (" A", " B", " C", " D")
TINY_VOCAB_SIZE = 264  # 256 bytes + bos, eos, pad + 4 merged letters, rounded up

_TINY_ARCH: Dict[str, Any] = dict(
    vocab_size=TINY_VOCAB_SIZE,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=64,
    max_seq_len=512,
    intermediate_dim=128,
    norm_eps=1e-5,
    rope_base=10000,
)


def tiny_llama() -> TransformerDecoder:
    """Plain tiny Llama3-style decoder (2 layers, d=64, GQA 4/2 heads)."""
    return llama3(**_TINY_ARCH)


def lora_tiny_llama(
    lora_attn_modules: Sequence[str] = tuple(DEFAULT_LORA_ATTN_MODULES),
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
) -> TransformerDecoder:
    """Tiny decoder with torchtune's ``LoRALinear`` on the given attention projections.

    Takes the keys of ``torchtune.models.llama3.lora_llama3_8b`` so that a Llama3-8B config's
    ``model`` section runs unchanged at this shape (tests/test_config_matrix.py)."""
    return lora_llama3(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        **_TINY_ARCH,
    )


def gaussian_lora_tiny_llama(
    lora_attn_modules: Sequence[str] = tuple(DEFAULT_LORA_ATTN_MODULES),
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    c: float = DEFAULT_C,
    sampling: str = DEFAULT_SAMPLING,
) -> TransformerDecoder:
    """Tiny decoder with ``GaussianLoRALinear`` on the given attention projections."""
    check_sampling(sampling)
    return add_gaussian_lora(tiny_llama(), lora_attn_modules, lora_rank, lora_alpha, c, sampling)


# Qwen2 at the same tiny shape: q/k/v projections with a bias, untied embeddings (as Qwen2-7B),
# and Qwen2's norm epsilon and RoPE base.
_TINY_QWEN2_ARCH: Dict[str, Any] = dict(_TINY_ARCH, norm_eps=1e-6, rope_base=1_000_000.0)


def tiny_qwen2() -> TransformerDecoder:
    """Plain tiny Qwen2-style decoder (torchtune's ``qwen2`` builder at the tiny shape)."""
    return qwen2(**_TINY_QWEN2_ARCH, tie_word_embeddings=False)


def lora_tiny_qwen2(
    lora_attn_modules: Sequence[str] = tuple(DEFAULT_LORA_ATTN_MODULES),
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """Tiny Qwen2 decoder with torchtune's ``LoRALinear`` on the given attention projections.

    Takes the keys of ``torchtune.models.qwen2.lora_qwen2_7b`` so that a Qwen2-7B config's
    ``model`` section runs unchanged at this shape (tests/test_config_matrix.py)."""
    return lora_qwen2(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        tie_word_embeddings=False,
        **_TINY_QWEN2_ARCH,
    )


def gaussian_lora_tiny_qwen2(
    lora_attn_modules: Sequence[str] = tuple(DEFAULT_LORA_ATTN_MODULES),
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    c: float = DEFAULT_C,
    sampling: str = DEFAULT_SAMPLING,
) -> TransformerDecoder:
    """Tiny Qwen2 decoder with ``GaussianLoRALinear`` on the given attention projections; the
    q/k/v biases stay frozen (as in ``abmll.models.gaussian_lora_qwen2_7b``)."""
    check_sampling(sampling)
    return add_gaussian_lora(tiny_qwen2(), lora_attn_modules, lora_rank, lora_alpha, c, sampling)


class TinyByteTokenizer:
    """Byte-level tokenizer in torchtune's ``ModelTokenizer`` shape."""

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = TINY_VOCAB_SIZE

    def __init__(self, max_seq_len: Optional[int] = None):
        self.max_seq_len = max_seq_len
        self._merged = {text: 259 + i for i, text in enumerate(_MERGED)}
        self._merged_inv = {v: k for k, v in self._merged.items()}

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        ids: List[int] = [self.bos_id] if add_bos else []
        i = 0
        while i < len(text):
            pair = text[i : i + 2]
            if pair in self._merged:
                ids.append(self._merged[pair])
                i += 2
                continue
            ids.extend(text[i].encode("utf-8"))
            i += 1
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for t in ids:
            if t < 256:
                out.append(t)
            elif t in self._merged_inv:
                out.extend(self._merged_inv[t].encode("utf-8"))
            elif not skip_special_tokens:
                out.extend(f"<{t}>".encode("utf-8"))
        return out.decode("utf-8", errors="replace")

    def tokenize_messages(
        self, messages: List[Message], add_end_tokens: bool = True
    ) -> Tuple[List[int], List[bool]]:
        """"role: content\\n" per message; mask is True where the loss is off (non-assistant)."""
        tokens: List[int] = [self.bos_id]
        mask: List[bool] = [True]
        for message in messages:
            header = self.encode(f"{message.role}:", add_bos=False, add_eos=False)
            body = self.encode(" " + message.text_content, add_bos=False, add_eos=False)
            masked = message.role != "assistant"
            tokens += header + body
            mask += [True] * len(header) + [masked] * len(body)
        if add_end_tokens:
            tokens.append(self.eos_id)
            mask.append(True)
        return tokens, mask


def tiny_tokenizer(max_seq_len: Optional[int] = None) -> TinyByteTokenizer:
    return TinyByteTokenizer(max_seq_len=max_seq_len)
