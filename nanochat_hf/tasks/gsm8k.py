"""GSM8K (openai/gsm8k): grade-school math with calculator tool calls, and nanochat's answer check and RL reward.

The reference solutions annotate each calculation as `<<expr=result>>`. nanochat turns every annotation into a python
part (`expr`) and its output (`result`) inside the assistant turn; here it becomes an assistant message with a python
tool call followed by a `tool` message, which the chat template renders as the same tokens with the same loss mask.
"""

from __future__ import annotations

import os
import re

import datasets
from datasets import Value

from .common import ConversationError, convert, load_source, require_columns, tool_call

GSM8K_REPO = "openai/gsm8k"
GSM8K_SPLITS = ("train", "test")
ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
_ANNOTATION_RE = re.compile(r"(<<[^>]+>>)")


def extract_answer(text: str) -> str | None:
    """The number after the first "#### " in `text`, commas removed (nanochat's extraction); None if there is none."""
    match = ANSWER_RE.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def gsm8k_reward(completion_text: str, reference_answer: str) -> float:
    """1.0 if the completion's "#### N" answer equals the reference, else 0.0 (nanochat's exact string match after
    removing commas). `reference_answer` is the bare number (a row's `answer`) or a text holding "#### N"."""
    reference = extract_answer(reference_answer)
    if reference is None:
        reference = reference_answer.strip().replace(",", "")
    return float(extract_answer(completion_text) == reference)


def solution_messages(answer: str) -> list[dict]:
    """The assistant side of a GSM8K solution: text up to each annotation, a tool call of its expression, a tool
    message with its result, and the remaining text after the last one. An annotation without "=" is a call with
    an empty output, as in nanochat."""
    messages: list[dict] = []
    text = ""
    for piece in _ANNOTATION_RE.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, _, result = piece[2:-2].rpartition("=") if "=" in piece else (piece[2:-2], "", "")
            messages.append({"role": "assistant", "content": text, "tool_calls": [tool_call(expr)]})
            messages.append({"role": "tool", "content": result})
            text = ""
        else:
            text += piece
    if text or not messages:
        messages.append({"role": "assistant", "content": text})
    return messages


def load_gsm8k(split: str = "train", path: str | os.PathLike | None = None) -> datasets.Dataset:
    """GSM8K "main" (train 7,473 / test 1,319). Rows carry `answer`: the number after "####", commas removed."""
    if split not in GSM8K_SPLITS:
        raise ValueError(f"gsm8k: unknown split {split!r}; choose one of {', '.join(GSM8K_SPLITS)}")
    source = load_source(GSM8K_REPO, "main", split, path)
    require_columns(source, ["question", "answer"], "gsm8k", str(path or GSM8K_REPO))

    def to_row(row: dict, i: int) -> dict:
        final = extract_answer(row["answer"] or "")
        if final is None:
            raise ConversationError(f"gsm8k row {i}: the answer has no final '#### <number>' line")
        messages = [{"role": "user", "content": row["question"]}, *solution_messages(row["answer"])]
        return {"messages": messages, "answer": final}

    return convert(source, "gsm8k", to_row, {"answer": Value("string")})
