"""A tiny byte-level tokenizer for the data-layer tests (imported by the other test_data_* files)."""

from __future__ import annotations

BOS, EOS, PAD = 256, 257, 258
LETTER_IDS = {" A": 259, " B": 260, " C": 261, " D": 262}
USER, ASSISTANT, EOT = 263, 264, 265


class ByteTokenizer:
    """Bytes, plus single tokens for " A".." D" (like abmll.models.tiny_tokenizer).

    ``merge_letters=False`` gives a pure byte tokenizer (" A" is two tokens).
    """

    bos_id, eos_id, pad_id = BOS, EOS, PAD
    max_seq_len = None

    def __init__(self, merge_letters: bool = True):
        self.merge_letters = merge_letters
        self.special_tokens = {"bos": BOS, "eos": EOS}

    def _text(self, text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            two = text[i : i + 2]
            if self.merge_letters and two in LETTER_IDS:
                out.append(LETTER_IDS[two])
                i += 2
            else:
                out.extend(text[i].encode("utf-8"))
                i += 1
        return out

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        return ([BOS] if add_bos else []) + self._text(text) + ([EOS] if add_eos else [])

    def decode(self, ids) -> str:
        inv = {v: k for k, v in LETTER_IDS.items()}
        out = []
        for t in ids:
            out.append(inv.get(t, "") if t >= 256 else bytes([t]).decode("latin-1"))
        return "".join(out)

    def tokenize_messages(self, messages, **kwargs):
        tokens, mask = [BOS], [True]
        for m in messages:
            head = USER if m.role == "user" else ASSISTANT
            body = [head] + self._text(m.text_content) + [EOT]
            tokens += body
            mask += [m.role != "assistant"] * len(body)
        return tokens, mask


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("Answer: B", add_bos=False, add_eos=False)) == "Answer: B"
    assert tok.encode("x A", add_bos=False, add_eos=False) == [ord("x"), LETTER_IDS[" A"]]
