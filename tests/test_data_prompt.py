import pytest
import torch
from test_data_common import ASSISTANT, EOT, LETTER_IDS, ByteTokenizer

from abmll.data import (
    IGNORE_INDEX,
    OPTION_LETTERS,
    MCExample,
    collate_mc,
    format_prompt,
    option_token_ids,
    tokenize_example,
)

EX = MCExample(task="t", input="Is the sky blue?", options=("yes", "no", "maybe"), output="no")


def test_example_label_and_validation():
    assert EX.label == 1
    assert MCExample("t", "q", ["a", "b"], "b").options == ("a", "b")
    with pytest.raises(ValueError, match="not among options"):
        MCExample("t", "q", ("a", "b"), "c")


def test_prompt_text_exact():
    assert format_prompt(EX) == (
        "Return the label of the correct answer for the question below.\n\n"
        "Question: Is the sky blue?\n\n"
        "Choices:\nA) yes\nB) no\nC) maybe\nAnswer:"
    )
    assert OPTION_LETTERS == ("A", "B", "C", "D")


def test_option_token_ids():
    assert option_token_ids(ByteTokenizer()) == [LETTER_IDS[" " + L] for L in "ABCD"]
    assert option_token_ids(ByteTokenizer(), chat_template=True) == [ord(L) for L in "ABCD"]
    with pytest.raises(ValueError, match="exactly one token"):
        option_token_ids(ByteTokenizer(merge_letters=False))


def test_tokenize_plain_target():
    tok = ByteTokenizer()
    out = tokenize_example(EX, tok, max_seq_len=512)
    toks = out["tokens"]
    assert toks[0] == tok.bos_id and toks[-1] == LETTER_IDS[" B"]
    assert out["answer_pos"] == len(toks) - 1
    assert tok.decode(toks[1:]) == format_prompt(EX) + " B"
    assert len(out["labels"]) == len(toks)
    assert [i for i, l in enumerate(out["labels"]) if l != IGNORE_INDEX] == [out["answer_pos"]]
    assert out["labels"][out["answer_pos"]] == toks[out["answer_pos"]]
    assert out["label"] == 1 and out["num_options"] == 3


def test_tokenize_chat_target():
    tok = ByteTokenizer()
    out = tokenize_example(EX, tok, max_seq_len=512, chat_template=True)
    toks, pos = out["tokens"], out["answer_pos"]
    assert toks[pos] == ord("B") and toks[pos - 1] == ASSISTANT and toks[pos + 1] == EOT
    assert out["labels"][pos] == ord("B")
    assert sum(l != IGNORE_INDEX for l in out["labels"]) == 1


@pytest.mark.parametrize("chat", [False, True])
def test_truncation_keeps_choices_and_answer(chat):
    tok = ByteTokenizer()
    long = MCExample("longtask", "word " * 100, ("alpha", "beta"), "beta")
    full = tokenize_example(long, tok, max_seq_len=10_000, chat_template=chat)
    out = tokenize_example(long, tok, max_seq_len=200, chat_template=chat)
    assert len(out["tokens"]) <= 200 and len(out["tokens"]) >= 199  # cut as little as possible
    assert len(full["tokens"]) > 200
    text = tok.decode(out["tokens"])
    assert text.count("Return the label") == 1
    assert "Choices:\nA) alpha\nB) beta\nAnswer:" in text
    assert out["tokens"][out["answer_pos"]] == option_token_ids(tok, chat)[1]
    assert out["labels"][out["answer_pos"]] == out["tokens"][out["answer_pos"]]
    with pytest.raises(ValueError, match=r"longtask.*max_seq_len=50"):
        tokenize_example(long, tok, max_seq_len=50, chat_template=chat)


def test_collate():
    tok = ByteTokenizer()
    a = tokenize_example(EX, tok, 512)
    b = tokenize_example(MCExample("t", "Q?", ("x", "y"), "x"), tok, 512)
    batch = collate_mc([a, b], pad_id=tok.pad_id)
    T = len(a["tokens"])
    assert batch["tokens"].shape == (2, T) and batch["tokens"].dtype == torch.long
    assert batch["tokens"][1, len(b["tokens"]):].eq(tok.pad_id).all()
    assert batch["labels"][1, len(b["tokens"]):].eq(IGNORE_INDEX).all()
    assert batch["answer_pos"].tolist() == [a["answer_pos"], b["answer_pos"]]
    assert batch["label"].tolist() == [1, 0] and batch["num_options"].tolist() == [3, 2]
    rows = torch.arange(2)
    assert batch["tokens"][rows, batch["answer_pos"]].tolist() == [LETTER_IDS[" B"], LETTER_IDS[" A"]]
