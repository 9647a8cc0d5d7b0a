"""HumanEval (openai/openai_humaneval): 164 Python functions to complete, scored by running their tests."""

from __future__ import annotations

import os

import datasets
from datasets import Value

from .common import convert, load_source, require_columns

HUMANEVAL_REPO = "openai/openai_humaneval"


def load_humaneval(split: str = "test", path: str | os.PathLike | None = None) -> datasets.Dataset:
    """nanochat's conversation: the user sends the prompt (signature + docstring), the reference reply is the prompt
    followed by the canonical solution. Rows carry `prompt`, `test` and `entry_point` for scoring (run the completed
    code, then `test`, then `check(entry_point)`), and `task_id`."""
    if split != "test":
        raise ValueError(f"humaneval: unknown split {split!r}; HumanEval has only 'test'")
    source = load_source(HUMANEVAL_REPO, "openai_humaneval", split, path)
    columns = ["task_id", "prompt", "canonical_solution", "test", "entry_point"]
    require_columns(source, columns, "humaneval", str(path or HUMANEVAL_REPO))

    def to_row(row: dict, i: int) -> dict:
        messages = [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"},
        ]
        return {"messages": messages, **{c: row[c] for c in ("task_id", "prompt", "test", "entry_point")}}

    extra = {c: Value("string") for c in ("task_id", "prompt", "test", "entry_point")}
    return convert(source, "humaneval", to_row, extra)
