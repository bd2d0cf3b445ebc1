"""SmolLM2's tokenizer as a torchtune ``ModelTokenizer``: encode/decode and the ChatML template.

It wraps the ``tokenizers.Tokenizer`` that :mod:`abmll.models._smollm2_convert` rebuilt from the
GGUF (byte-level BPE, llama.cpp's ``smollm`` pre-tokenizer, control tokens as special tokens).

torchtune 0.6.1's ``HuggingFaceBaseTokenizer`` (a ``tokenizer.json`` wrapper) is not used:
its ``encode(add_bos=True)`` prepends ``bos_id`` whenever the HF tokenizer does not add one
itself, but SmolLM2 has no BOS (``add_bos_token`` is False; its "bos" is ``<|im_start|>``), so it
would start every sequence the recipe encodes with a stray ``<|im_start|>``; and its ``decode``
cannot keep special tokens. ``tests/test_smollm2.py`` shows the difference.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from torchtune.data import Message
from torchtune.data._utils import truncate
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from abmll.cache import PathLike
from abmll.models._smollm2_convert import ensure_smollm2_checkpoint

#: The system turn SmolLM2's chat template inserts when the conversation has none.
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


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
