"""Synthetic spelling tasks, as in nanochat: SimpleSpelling ("spell this word") and SpellingBee ("how many r in
strawberry?", solved by spelling the word, counting by hand, then checking with a python tool call).

Small models cannot see the letters inside their tokens; over-representing spelling teaches the token -> letters map.
Example i of the train split is drawn from `random.Random(i)`, of the test split from `random.Random(10_000_000 + i)`,
so the rows depend only on the word list, the split and the index.

Word lists: nanochat uses dwyl's words_alpha.txt (370K English words), downloaded once and cached; any file with one
word per line works (`path=`). :func:`embedded_words` is a small offline list for the CPU tier.
"""

from __future__ import annotations

import collections
import os
import random
import re
import string
import urllib.request
from pathlib import Path

import datasets
from datasets import Value

from .common import conversations_dataset, tool_call

WORD_LIST_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
TEST_SEED_OFFSET = 10_000_000  # more than any split size: train and test never share a seed
LETTERS = string.ascii_lowercase

# Ways to ask; {letter} and {word} may be quoted. Several languages, as real users mix them.
QUESTIONS = (
    "How many {letter} are in the word {word}",
    "How many {letter} are there in {word}",
    "How many times does the letter {letter} occur in {word}",
    "Count the {letter} in {word}",
    "Count how many times {letter} shows up in {word}",
    "How often does {letter} appear in the word {word}",
    "In {word}, how many {letter} do you see",
    "What is the number of {letter} in {word}",
    "Number of {letter}'s in {word}",
    "Tell me how many {letter} the word {word} has",
    "{word}: how many {letter}",
    "Could you count the letter {letter} in {word}",
    "How many {letter}s does {word} contain",
    "Give me the count of the letter {letter} in {word}",
    "How many occurrences of {letter} does {word} have",
    "¿Cuántas veces aparece la letra {letter} en {word}",
    "Combien de fois la lettre {letter} apparaît-elle dans {word}",
    "Wie oft kommt der Buchstabe {letter} in {word} vor",
    "{word}这个单词里有几个{letter}",
    "{word}에는 {letter}가 몇 개 있어요",
    "{word}の中に{letter}はいくつありますか",
)


def embedded_words(min_count: int = 2) -> list[str]:
    """About 2,000 lowercase English words (3-12 letters) from the Python documentation topics that ship with every
    CPython (`pydoc_data`), sorted: an offline word list, fixed for a given Python build."""
    import pydoc_data.topics

    counts: collections.Counter[str] = collections.Counter()
    for name in sorted(pydoc_data.topics.topics):
        counts.update(re.findall(r"(?<![A-Za-z0-9_])[a-z]{3,12}(?![A-Za-z0-9_])", pydoc_data.topics.topics[name]))
    return sorted(w for w, n in counts.items() if n >= min_count)


def _cached_word_list() -> Path:
    from huggingface_hub import constants

    cached = Path(constants.HF_HOME) / "nanochat_hf" / "words_alpha.txt"
    if cached.is_file():
        return cached
    if constants.is_offline_mode():
        raise FileNotFoundError(
            f"spelling: offline (HF_HUB_OFFLINE=1) and no word list at {cached}; download {WORD_LIST_URL} there, "
            "or pass path= to a word list (one word per line)"
        )
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(f".{os.getpid()}.tmp")
    try:
        urllib.request.urlretrieve(WORD_LIST_URL, partial)
        os.replace(partial, cached)  # atomic: a concurrent reader sees the whole file or none
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"spelling: could not download the word list {WORD_LIST_URL} ({err}); pass path= to a word list"
        ) from err
    return cached


def load_words(path: str | os.PathLike | None = None) -> list[str]:
    """Words from a file with one word per line (blank lines skipped); by default nanochat's words_alpha.txt."""
    file = Path(path) if path is not None else _cached_word_list()
    if not file.is_file():
        raise FileNotFoundError(f"spelling: no such word list {file}; pass a text file with one word per line")
    words = [w.strip() for w in file.read_text(encoding="utf-8").splitlines() if w.strip()]
    bad = next((w for w in words if not w.isalpha()), None)
    if not words or bad is not None:
        raise ValueError(f"spelling: {file} must list words of letters only, one per line; found {bad!r}")
    return words


def _rng(split: str, index: int) -> random.Random:
    if split not in ("train", "test"):
        raise ValueError(f"spelling: unknown split {split!r}; choose train or test")
    return random.Random(index if split == "train" else TEST_SEED_OFFSET + index)


def simple_spelling(words: list[str], split: str = "train", size: int = 1000) -> datasets.Dataset:
    """Spelling: "Spell the word: apple" -> "apple:a,p,p,l,e". Draws from its own shuffle of `words`, so it does not pick
    the same words as :func:`spelling_bee` for the same index."""
    order = list(words)
    random.Random(42).shuffle(order)
    rows = []
    for i in range(size):
        word = _rng(split, i).choice(order)
        messages = [
            {"role": "user", "content": f"Spell the word: {word}"},
            {"role": "assistant", "content": f"{word}:{','.join(word)}"},
        ]
        rows.append({"messages": messages})
    return conversations_dataset(rows)


def spelling_bee_messages(rng: random.Random, words: list[str]) -> tuple[list[dict], int]:
    """One letter-counting conversation and its answer."""
    word = rng.choice(words)
    letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)  # sometimes a letter it lacks
    count = word.count(letter)
    question = rng.choice(QUESTIONS)
    if rng.random() < 0.3:
        question = question.lower()
    letter_q, word_q = rng.choice(("", "'", '"')), rng.choice(("", "'", '"'))
    question = question.format(letter=f"{letter_q}{letter}{letter_q}", word=f"{word_q}{word}{word_q}")
    if rng.random() < 0.5:
        question += "?"
    # "3:r" with no space: " r" would be a different token from the "r" of the spelled-out word.
    steps = "".join(
        f"{i}:{ch} hit! count={word[:i].count(letter)}\n" if ch == letter else f"{i}:{ch}\n"
        for i, ch in enumerate(word, 1)
    )
    by_hand = (
        f"I need to count the letter '{letter}' in '{word}'. First I spell the word:\n{word}:{','.join(word)}\n\n"
        f"Now I go through it letter by letter, counting '{letter}':\n{steps}\nBy hand I get {count}.\n\n"
        "Let me check with Python:\n\n"
    )
    messages = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": by_hand, "tool_calls": [tool_call(f"'{word}'.count('{letter}')")]},
        {"role": "tool", "content": str(count)},
        {"role": "assistant", "content": f"\n\nPython says {count} as well.\n\nFinal answer:\n\n#### {count}"},
    ]
    return messages, count


def spelling_bee(words: list[str], split: str = "train", size: int = 1000) -> datasets.Dataset:
    """Letter counting with a manual count checked by a python tool call; rows carry `answer` (the count)."""
    rows = []
    for i in range(size):
        messages, count = spelling_bee_messages(_rng(split, i), words)
        rows.append({"messages": messages, "answer": str(count)})
    return conversations_dataset(rows, {"answer": Value("string")})
