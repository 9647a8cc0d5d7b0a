"""HumanEval (openai/openai_humaneval): 164 Python functions to complete, scored by running their tests.

Scoring follows nanochat HEAD's tasks/humaneval.py (nanochat-spec.md §5.3). The program is the prompt's import lines,
then the reply's code, then the item's tests and ``check(entry_point)``. The sandbox run lives with the chat
evaluations (nanochat_hf/evaluation/chat.py).
"""

from __future__ import annotations

import os
import re

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


# nanochat's rule for the reply's code: the first block that opens with ``` or ```python, then only whitespace up to
# a newline, and that closes with a newline followed by ```. The regex scans left to right, and the body is the
# shortest match. So a ```py or ```python3 fence opens nothing, a closing fence written on the code's last line
# closes nothing, and a closing ``` followed by a newline can itself open the match.
_CODE_BLOCK = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def extract_program(completion: str) -> str:
    """The reply's program as nanochat takes it: the first fenced block (see _CODE_BLOCK), else the whole reply;
    stripped either way, which also strips the first line's indentation."""
    match = _CODE_BLOCK.search(completion)
    return (match.group(1) if match else completion).strip()


def prompt_imports(prompt: str) -> str:
    """The prompt's leading import lines, stripped, up to the first line that is neither blank, a comment nor an
    import. A reply that restates only the function lacks them. Lines end at "\\n" only, as in nanochat."""
    imports = []
    for line in prompt.split("\n"):
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def humaneval_program(row: dict, completion: str) -> str:
    """The program nanochat runs for a reply to `row` (which has `prompt`, `test` and `entry_point`)."""
    return (f"{prompt_imports(row['prompt'])}\n\n{extract_program(completion)}\n\n{row['test']}\n"
            f"check({row['entry_point']})")
