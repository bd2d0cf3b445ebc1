"""The paper's multiple-choice prompt, answer-letter targets, and collation.

Prompt (paper, appendix A.2)::

    Return the label of the correct answer for the question below.

    Question: {input}

    Choices:
    A) {option 0}
    B) {option 1}
    Answer:

Plain mode: ``tokens = BOS + encode(prompt) + [letter]`` where the letter token is the one
the tokenizer produces for ``" A"`` right after ``"Answer:"``. No EOS is appended: the loss is
on the answer letter only, so an EOS would never be trained and would only cost a position.

Chat mode: ``tokenizer.tokenize_messages([user: prompt, assistant: "A"])``; whatever the
template puts after the assistant content (end-of-turn tokens) stays in ``tokens`` but gets
label -100. ``labels`` follow torchtune's convention (same length as ``tokens``, not shifted):
``labels[answer_pos] == tokens[answer_pos]``, every other entry is -100.

Demonstrations (``data.num_demonstrations``, MetaICL's "direct" in-context learning): k solved
examples of the same task come before the question, each in the same prompt format with its
answer letter filled in. Plain mode joins them with blank lines::

    {prompt of demonstration 1} B

    {prompt of demonstration 2} A

    {prompt of the question}        <- ends with "Answer:", target " A".." D" as above

Chat mode gives each demonstration its own earlier user/assistant turn, so the model sees the
solved examples as answers it gave itself in the very format it must answer in, and the
question's answer letter stays the last assistant content (``answer_pos`` as above). The letters
of the demonstrations are part of the prompt: label -100, only the question's letter is trained.
With no demonstrations every prompt is the zero-shot prompt above, token for token.
"""

from __future__ import annotations

from typing import Any

import torch

from .examples import MCExample

__all__ = [
    "IGNORE_INDEX",
    "OPTION_LETTERS",
    "PROMPT_HEADER",
    "DEMONSTRATION_SEPARATOR",
    "collate_mc",
    "format_demonstration",
    "format_prompt",
    "format_with_demonstrations",
    "option_token_ids",
    "tokenize_example",
]

OPTION_LETTERS = ("A", "B", "C", "D")
PROMPT_HEADER = "Return the label of the correct answer for the question below."
# == torchtune.data.CROSS_ENTROPY_IGNORE_IDX (not imported: importing torchtune costs seconds).
IGNORE_INDEX = -100

_DUMMY = MCExample(task="_probe", input="Is this a probe?", options=("yes", "no", "maybe", "never"), output="yes")


def format_prompt(example: MCExample) -> str:
    """The paper's prompt text, ending with ``"Answer:"`` (the target is ``" A"`` etc.)."""
    n = len(example.options)
    if not 1 <= n <= len(OPTION_LETTERS):
        raise ValueError(
            f"task {example.task!r}: {n} options; the prompt supports 1-{len(OPTION_LETTERS)} (A-D)"
        )
    choices = "\n".join(f"{OPTION_LETTERS[i]}) {o}" for i, o in enumerate(example.options))
    return f"{PROMPT_HEADER}\n\nQuestion: {example.input}\n\nChoices:\n{choices}\nAnswer:"


#: Between demonstrations, and between the last one and the question (plain mode).
DEMONSTRATION_SEPARATOR = "\n\n"


def format_demonstration(example: MCExample) -> str:
    """A solved example: its prompt with its answer letter filled in (``"...Answer: B"``)."""
    return f"{format_prompt(example)} {OPTION_LETTERS[example.label]}"


def format_with_demonstrations(example: MCExample, demonstrations=()) -> str:
    """The plain-mode prompt text: the solved ``demonstrations`` in order, then the question's
    prompt (ending with ``"Answer:"``). No demonstrations: :func:`format_prompt`."""
    parts = [format_demonstration(d) for d in demonstrations] + [format_prompt(example)]
    return DEMONSTRATION_SEPARATOR.join(parts)


def _messages(prompt: str, letter: str, demonstrations=()):
    from torchtune.data import Message  # lazy: importing torchtune takes seconds

    turns = [(format_prompt(d), OPTION_LETTERS[d.label]) for d in demonstrations] + [(prompt, letter)]
    return [
        Message(role=role, content=content)
        for user, assistant in turns
        for role, content in (("user", user), ("assistant", assistant))
    ]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_bos=True, add_eos=False))


def _chat_tokens(tokenizer, prompt: str, letter: str, demonstrations=()) -> list[int]:
    tokens, _mask = tokenizer.tokenize_messages(_messages(prompt, letter, demonstrations))
    return list(tokens)


class _AnswerNotFound(ValueError):
    """The chat template's tokens do not end with the answer where expected (the tokenizer cut
    them to its own ``max_seq_len``)."""


class _AnswerInfo:
    """Per (tokenizer, chat_template): letter token ids and, in chat mode, how many tokens
    the template puts after the answer letter."""

    __slots__ = ("letter_ids", "suffix_len")

    def __init__(self, letter_ids: list[int], suffix_len: int):
        self.letter_ids = letter_ids
        self.suffix_len = suffix_len


_CACHE: dict[tuple[int, bool], tuple[Any, _AnswerInfo]] = {}


def _answer_letters(tokenizer, chat_template: bool) -> _AnswerInfo:
    key = (id(tokenizer), bool(chat_template))
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    prompt = format_prompt(_DUMMY)
    mode = "chat-template" if chat_template else "plain"
    if chat_template:
        seqs = [_chat_tokens(tokenizer, prompt, L) for L in OPTION_LETTERS]
        n = len(seqs[0])
        if any(len(s) != n for s in seqs):
            raise ValueError(
                f"option letters {OPTION_LETTERS} do not tokenize to the same length in {mode} mode "
                f"(lengths {[len(s) for s in seqs]}): each letter must be a single token"
            )
        diff = [t for t in range(n) if len({s[t] for s in seqs}) > 1]
        if len(diff) != 1:
            raise ValueError(
                f"option letters must differ in exactly one token position in {mode} mode; "
                f"they differ at positions {diff}"
            )
        pos = diff[0]
        ids = [s[pos] for s in seqs]
        info = _AnswerInfo(ids, n - pos - 1)
    else:
        prefix = _encode(tokenizer, prompt)
        ids = []
        for L in OPTION_LETTERS:
            full = _encode(tokenizer, prompt + " " + L)
            if len(full) != len(prefix) + 1:
                raise ValueError(
                    f"option letter {L!r}: ' {L}' after 'Answer:' is {len(full) - len(prefix)} tokens "
                    f"in {mode} mode; it must be exactly one token"
                )
            if full[: len(prefix)] != prefix:
                raise ValueError(
                    f"option letter {L!r}: the prompt tokens change when ' {L}' is appended "
                    f"({mode} mode); the answer letter must be a separate token"
                )
            ids.append(full[-1])
        info = _AnswerInfo(ids, 0)
    if len(set(info.letter_ids)) != len(info.letter_ids):
        raise ValueError(f"option letters {OPTION_LETTERS} map to non-distinct token ids {info.letter_ids}")
    _CACHE[key] = (tokenizer, info)
    return info


def option_token_ids(tokenizer, chat_template: bool = False) -> list[int]:
    """Token id of each letter A..D as it appears at the answer position.

    Found by tokenizing one dummy example per letter; raises ``ValueError`` if a letter is not
    a single token there or the tokens before it differ between letters.
    """
    return list(_answer_letters(tokenizer, chat_template).letter_ids)


def _build(example: MCExample, tokenizer, chat_template: bool, info: _AnswerInfo, demonstrations=()):
    prompt = format_prompt(example)
    letter = OPTION_LETTERS[example.label]
    target = info.letter_ids[example.label]
    if chat_template:
        tokens = _chat_tokens(tokenizer, prompt, letter, demonstrations)
        pos = len(tokens) - 1 - info.suffix_len
        if pos < 0 or tokens[pos] != target:
            raise _AnswerNotFound(
                f"task {example.task!r}: answer letter {letter!r} not found at the expected position "
                f"of the chat-template tokens (does the tokenizer truncate to its own max_seq_len?)"
            )
    else:
        text = format_with_demonstrations(example, demonstrations) if demonstrations else prompt
        tokens = _encode(tokenizer, text) + [target]
        pos = len(tokens) - 1
    return tokens, pos


def _with_demonstrations(example: MCExample, demonstrations, tokenizer, chat_template: bool,
                         info: _AnswerInfo, max_seq_len: int):
    """(tokens, answer_pos, how many demonstrations were kept) for the longest suffix of
    ``demonstrations`` whose prompt fits ``max_seq_len``; None if not even one fits.

    Whole demonstrations are dropped, the first (farthest from the question) first, as MetaICL
    keeps the end of a too-long context; the question is never cut while one is left."""
    for start in range(len(demonstrations)):
        kept = demonstrations[start:]
        try:
            tokens, pos = _build(example, tokenizer, chat_template, info, kept)
        except _AnswerNotFound:  # the tokenizer cut it to its own max_seq_len: too long
            continue
        if len(tokens) <= max_seq_len:
            return tokens, pos, len(kept)
    return None


def tokenize_example(
    example: MCExample, tokenizer, max_seq_len: int, chat_template: bool = False, demonstrations=()
) -> dict:
    """Tokenize one example with its answer letter as the only trained token.

    Returns ``{"tokens", "labels", "answer_pos", "label", "num_options", "demonstrations"}``.
    ``demonstrations``: solved examples put before the question (module docstring); the
    caller chooses them (:class:`abmll.data.TaskSampler` draws them from the task, never the
    question itself). A prompt longer than ``max_seq_len`` first loses whole demonstrations,
    the first first (``"demonstrations"`` says how many were kept); with none left, it is
    shortened by cutting characters from the end of the question text (``example.input``); the
    header, the choices and the answer are never cut. If even an empty question does not fit,
    raises ``ValueError`` naming the task and ``max_seq_len``.
    """
    info = _answer_letters(tokenizer, chat_template)
    demonstrations = tuple(demonstrations)
    if demonstrations:
        fitted = _with_demonstrations(example, demonstrations, tokenizer, chat_template, info, max_seq_len)
        if fitted is not None:
            return _item(example, *fitted)
    # No demonstrations (or none fits): the zero-shot prompt, its question cut if need be.
    tokens, pos = _build(example, tokenizer, chat_template, info)
    if len(tokens) > max_seq_len:
        text = example.input

        def attempt(n_chars: int):
            ex = MCExample(example.task, text[:n_chars], example.options, example.output)
            return _build(ex, tokenizer, chat_template, info)

        tokens, pos = attempt(0)
        if len(tokens) > max_seq_len:
            raise ValueError(
                f"task {example.task!r}: the prompt with an empty question is {len(tokens)} tokens, "
                f"more than max_seq_len={max_seq_len} (the choices and the answer cannot be cut); "
                f"raise max_seq_len"
            )
        lo, hi = 0, len(text)  # invariant: lo fits, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            t, p = attempt(mid)
            if len(t) <= max_seq_len:
                lo, tokens, pos = mid, t, p
            else:
                hi = mid
    return _item(example, tokens, pos, 0)


def _item(example: MCExample, tokens: list[int], pos: int, num_demonstrations: int) -> dict:
    labels = [IGNORE_INDEX] * len(tokens)
    labels[pos] = tokens[pos]
    return {
        "tokens": tokens,
        "labels": labels,
        "answer_pos": pos,
        "label": example.label,
        "num_options": len(example.options),
        "demonstrations": num_demonstrations,  # kept before the question (0: zero-shot)
    }


def collate_mc(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of :func:`tokenize_example` outputs into tensors."""
    if not batch:
        raise ValueError("collate_mc: empty batch")
    T = max(len(b["tokens"]) for b in batch)
    B = len(batch)
    tokens = torch.full((B, T), int(pad_id), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["tokens"])
        tokens[i, :n] = torch.tensor(b["tokens"], dtype=torch.long)
        labels[i, :n] = torch.tensor(b["labels"], dtype=torch.long)
    return {
        "tokens": tokens,
        "labels": labels,
        "answer_pos": torch.tensor([b["answer_pos"] for b in batch], dtype=torch.long),
        "label": torch.tensor([b["label"] for b in batch], dtype=torch.long),
        "num_options": torch.tensor([b["num_options"] for b in batch], dtype=torch.long),
    }
