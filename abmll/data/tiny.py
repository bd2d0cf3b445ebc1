"""The built-in ``tiny`` task set: small, deterministic, synthetic, no files.

Eight meta-training tasks and three unseen tasks (different kinds of question),
each with 48 examples of 2-4 options and inputs under 60 characters, so that a
byte-level tokenizer with ``max_seq_len`` 256 fits the whole prompt. Unseen
tasks are split in half: first half validation, second half test (disjoint).
"""

from __future__ import annotations

import random

from .examples import MCExample, SplitTasks

__all__ = ["TINY_TRAIN_TASKS", "TINY_UNSEEN_TASKS", "tiny_split"]

N_EXAMPLES = 48

_ANIMALS = ["cat", "dog", "cow", "horse", "tiger", "lion", "mouse", "sheep", "goat", "duck", "fox", "bear"]
_OBJECTS = ["table", "chair", "spoon", "lamp", "door", "book", "cup", "shoe", "rock", "pen", "box", "coin"]
_COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"]
_POS = ["great", "lovely", "excellent", "wonderful", "superb", "pleasant", "fantastic", "delightful"]
_NEG = ["awful", "terrible", "horrible", "dreadful", "nasty", "boring", "lousy", "miserable"]
_THINGS = ["food", "movie", "hotel", "service", "book", "trip", "show", "meal"]
_WORDS = _ANIMALS + _OBJECTS + _COLORS
_ANTONYMS = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("old", "new"),
             ("happy", "sad"), ("light", "dark"), ("hard", "soft"), ("wet", "dry"), ("early", "late"),
             ("rich", "poor"), ("open", "closed"), ("full", "empty"), ("long", "short"),
             ("near", "far"), ("clean", "dirty"), ("loud", "quiet"), ("thick", "thin"), ("strong", "weak"),
             ("high", "low"), ("sweet", "sour"), ("brave", "afraid"), ("push", "pull"), ("win", "lose")]
_LETTERS = "abcdefghijklmnoprstuwy"


def _ex(task: str, rng: random.Random, text: str, correct: str, distractors: list[str]) -> MCExample:
    opts = [correct] + [d for d in distractors if d != correct]
    # de-duplicate while keeping order, then shuffle
    opts = list(dict.fromkeys(opts))
    rng.shuffle(opts)
    return MCExample(task=task, input=text, options=tuple(opts), output=correct)


def _parity(rng):
    n = rng.randint(0, 999)
    return f"Is {n} even or odd?", ("even" if n % 2 == 0 else "odd"), ["even", "odd"]


def _larger(rng):
    a, b = rng.sample(range(100), 2)
    return f"Which number is larger: {a} or {b}?", str(max(a, b)), [str(a), str(b)]


def _animal(rng):
    a = rng.choice(_ANIMALS)
    others = rng.sample(_OBJECTS, rng.randint(1, 3))
    return "Which word is an animal?", a, others


def _color(rng):
    c = rng.choice(_COLORS)
    others = rng.sample(_ANIMALS + _OBJECTS, rng.randint(1, 3))
    return "Which word is a color?", c, others


def _first_letter(rng):
    w = rng.choice(_WORDS)
    others = rng.sample([c for c in _LETTERS if c != w[0]], 3)
    return f"What is the first letter of '{w}'?", w[0], others


def _sentiment(rng):
    pos = rng.random() < 0.5
    word = rng.choice(_POS if pos else _NEG)
    return f"The {rng.choice(_THINGS)} was {word}.", ("positive" if pos else "negative"), ["positive", "negative"]


def _count_x(rng):
    n = rng.randint(0, 3)
    s = ["x"] * n + [rng.choice("abcdyz") for _ in range(rng.randint(2, 6))]
    rng.shuffle(s)
    return f"How many x in '{''.join(s)}'?", str(n), ["0", "1", "2", "3"]


def _add(rng):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    s = a + b
    wrong = rng.sample([v for v in range(max(0, s - 3), s + 4) if v != s], 3)
    return f"What is {a} plus {b}?", str(s), [str(v) for v in wrong]


# unseen kinds: threshold yes/no, word length comparison, antonyms
def _over_fifty(rng):
    n = rng.randint(0, 100)
    while n == 50:
        n = rng.randint(0, 100)
    return f"Is {n} more than 50?", ("yes" if n > 50 else "no"), ["yes", "no"]


def _longest(rng):
    k = rng.randint(2, 4)
    while True:
        ws = rng.sample(_WORDS, k)
        lens = sorted(len(w) for w in ws)
        if lens[-1] > lens[-2]:
            break
    longest = max(ws, key=len)
    return "Which word is the longest?", longest, ws


def _antonym(rng):
    a, b = rng.choice(_ANTONYMS)
    if rng.random() < 0.5:
        a, b = b, a
    others = [p[rng.randint(0, 1)] for p in rng.sample([p for p in _ANTONYMS if a not in p], 3)]
    return f"What is the opposite of '{a}'?", b, others


_TRAIN = {
    "parity": _parity, "larger_number": _larger, "animal_word": _animal, "color_word": _color,
    "first_letter": _first_letter, "sentiment": _sentiment, "count_x": _count_x, "add_digits": _add,
}
_UNSEEN = {"more_than_fifty": _over_fifty, "longest_word": _longest, "antonym": _antonym}

TINY_TRAIN_TASKS = tuple(_TRAIN)
TINY_UNSEEN_TASKS = tuple(_UNSEEN)


def _make(task: str, gen, n: int = N_EXAMPLES, unique: bool = False) -> list[MCExample]:
    """``n`` examples from ``gen``; with ``unique`` no two share input, answer and option set
    (used for unseen tasks, so that their validation and test halves share no example)."""
    rng = random.Random(f"abmll-tiny|{task}")
    out, seen = [], set()
    for _ in range(100 * n):
        ex = _ex(task, rng, *gen(rng))
        key = (ex.input, ex.output, frozenset(ex.options)) if task == "longest_word" else (ex.input, ex.output)
        if unique and key in seen:
            continue
        seen.add(key)
        out.append(ex)
        if len(out) == n:
            return out
    raise RuntimeError(f"tiny task {task!r}: could not generate {n} distinct examples")


def tiny_split() -> SplitTasks:
    train = {t: _make(t, g) for t, g in _TRAIN.items()}
    val, test = {}, {}
    for t, g in _UNSEEN.items():
        exs = _make(t, g, unique=True)
        half = len(exs) // 2
        val[t], test[t] = exs[:half], exs[half:]
    return SplitTasks(name="tiny", train=train, val=val, test=test)
