"""Multiple-choice tasks: MMLU (cais/mmlu) and ARC (allenai/ai2_arc), rendered with nanochat's prompt.

Each row: `messages` (user = the rendered question, assistant = the correct letter), `letters` (the letters offered)
and `answer` (the correct letter). nanochat scores these categorically: the logits of the letter tokens right after
`<|assistant_start|>`.
"""

from __future__ import annotations

import os

import datasets
from datasets import List, Value

from .common import ConversationError, convert, load_source, render_mc, require_columns

MMLU_REPO = "cais/mmlu"
ARC_REPO = "allenai/ai2_arc"
MMLU_LETTERS = ("A", "B", "C", "D")
MMLU_SPLITS = ("auxiliary_train", "validation", "dev", "test")
ARC_SUBSETS = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}
ARC_SPLITS = ("train", "validation", "test")

_SCORING = {"letters": List(Value("string")), "answer": Value("string")}


def _check_split(dataset: str, split: str, splits: tuple[str, ...]) -> None:
    if split not in splits:
        raise ValueError(f"{dataset}: unknown split {split!r}; choose one of {', '.join(splits)}")


def load_mmlu(split: str = "auxiliary_train", path: str | os.PathLike | None = None) -> datasets.Dataset:
    """MMLU's config "all": `auxiliary_train` (~100K questions drawn from ARC, MC_TEST, OBQA and RACE) for training,
    `test` (14,042) for evaluation. Rows also carry `subject`."""
    _check_split("mmlu", split, MMLU_SPLITS)
    try:
        source = load_source(MMLU_REPO, "all", split, path)
    except FileNotFoundError as err:
        if split != "auxiliary_train" or path is None:
            raise
        try:  # a copy of the Hub's separate "auxiliary_train" config holds the same rows as its split "train"
            source = load_source(MMLU_REPO, "auxiliary_train", "train", path)
        except FileNotFoundError:
            raise err from None
    if "train" in source.column_names and "question" not in source.column_names:
        # The Hub's separate "auxiliary_train" config wraps each row in a struct column named "train".
        source = source.map(lambda row: row["train"], remove_columns=["train"])
    require_columns(source, ["question", "subject", "choices", "answer"], "mmlu", str(path or MMLU_REPO))

    def to_row(row: dict, i: int) -> dict:
        choices, answer = row["choices"], row["answer"]
        if len(choices) != len(MMLU_LETTERS):
            raise ConversationError(f"mmlu row {i}: expected 4 choices, got {len(choices)}")
        if not isinstance(answer, int) or not 0 <= answer < len(MMLU_LETTERS):
            raise ConversationError(f"mmlu row {i}: answer must be a choice index 0-3, got {answer!r}")
        letter = MMLU_LETTERS[answer]
        messages = [
            {"role": "user", "content": render_mc(row["question"], MMLU_LETTERS, choices)},
            {"role": "assistant", "content": letter},
        ]
        return {"messages": messages, "letters": list(MMLU_LETTERS), "answer": letter, "subject": row["subject"]}

    return convert(source, "mmlu", to_row, {**_SCORING, "subject": Value("string")})


def load_arc(name: str, split: str = "train", path: str | os.PathLike | None = None) -> datasets.Dataset:
    """ARC-Easy (`arc_easy`) or ARC-Challenge (`arc_challenge`); the letters come from the dataset (some
    questions offer 3 or 5 choices, some use digits). Rows also carry the question `id`."""
    _check_split(name, split, ARC_SPLITS)
    source = load_source(ARC_REPO, ARC_SUBSETS[name], split, path)
    require_columns(source, ["id", "question", "choices", "answerKey"], name, str(path or ARC_REPO))

    def to_row(row: dict, i: int) -> dict:
        letters, texts, answer = row["choices"]["label"], row["choices"]["text"], row["answerKey"]
        if not letters or len(letters) != len(texts):
            raise ConversationError(f"{name} row {i}: choices need as many labels as texts, got {letters} / {texts}")
        if answer not in letters:
            raise ConversationError(f"{name} row {i}: answerKey {answer!r} is not one of the labels {letters}")
        messages = [
            {"role": "user", "content": render_mc(row["question"], letters, texts)},
            {"role": "assistant", "content": answer},
        ]
        return {"messages": messages, "letters": list(letters), "answer": answer, "id": row["id"]}

    return convert(source, name, to_row, {**_SCORING, "id": Value("string")})
