"""What every task shares: the `messages` schema, the conversation rules, and loading a Hub dataset or a local copy.

Conversations use the Hugging Face `messages` format. A tool use (nanochat's python part and its output) is an
assistant message with `tool_calls` followed by a `tool` message; the project's chat template renders both inside one
nanochat assistant turn. All tasks store `messages` with the same Arrow schema (:data:`MESSAGES`), so any of them can
be concatenated into a mixture.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import datasets
from datasets import Features, List, Value

# One Arrow schema for every conversation. Tool-call arguments are a struct holding the python code: nanochat's only
# tool is its python calculator, and a fixed struct keeps every task's rows concatenable.
TOOL_CALL = {"type": Value("string"), "function": {"name": Value("string"), "arguments": {"code": Value("string")}}}
MESSAGE = {"role": Value("string"), "content": Value("string"), "tool_calls": List(TOOL_CALL)}
MESSAGES = List(MESSAGE)

ROLES = ("system", "user", "assistant", "tool")


class ConversationError(ValueError):
    """A conversation (or the source row it was built from) breaks a rule; the message names the dataset and row."""


def tool_call(code: str) -> dict:
    """An assistant tool call of nanochat's python tool (rendered as `<|python_start|>code<|python_end|>`)."""
    return {"type": "function", "function": {"name": "python", "arguments": {"code": code}}}


def render_mc(question: str, letters: Iterable[str], choices: Iterable[str]) -> str:
    """nanochat's multiple-choice prompt. The letter comes after its choice with no space after "=", so the letter
    the model answers with is the same token as in the prompt."""
    lines = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices, strict=True))
    return f"Multiple Choice question: {question}\n{lines}\nRespond only with the letter of the correct answer."


# ---------------------------------------------------------------------------------------------------------------
# The rules


def _text_of(content: Any, role: str) -> str | None:
    """The text of a message's content, or None when the content has the wrong type."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        kinds = ("text", "python", "python_output") if role == "assistant" else ("text",)
        if all(isinstance(p, dict) and p.get("type") in kinds and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
    return None


def _check_tool_calls(calls: Any, where: str) -> int:
    if not isinstance(calls, list):
        raise ConversationError(f"{where}: tool_calls must be a list, got {type(calls).__name__}")
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ConversationError(f"{where}: tool call {j} has no function name (expected {tool_call('1+1')})")
        if not isinstance(fn.get("arguments"), (dict, str)):
            raise ConversationError(f"{where}: tool call {j} needs arguments (a dict or a JSON string)")
    return len(calls)


def validate_messages(messages: Any, dataset: str, row: int) -> None:
    """Raise ConversationError unless `messages` is a conversation the chat template renders as nanochat would.

    Rules: an optional first system message; then user and assistant messages alternate, starting with a user
    message and containing at least one assistant reply; an assistant message may carry tool_calls, each answered
    by one following tool message, after which the same assistant turn may continue with another assistant message;
    roles are system/user/assistant/tool; system, user and assistant text is non-empty (an assistant message that
    only calls a tool may have empty text; a tool output may be empty). The error names `dataset`, `row`, the message
    index and the rule broken.
    """
    at = f"{dataset} row {row}"
    if not isinstance(messages, list) or not messages:
        raise ConversationError(f"{at}: messages must be a non-empty list of {{'role', 'content'}} dicts")
    prev = ""  # the previous role, system excluded
    pending = 0  # tool calls of the current assistant turn still waiting for their tool message
    replied = False
    for i, message in enumerate(messages):
        where = f"{at}, message {i}"
        if not isinstance(message, dict):
            raise ConversationError(f"{where}: a message must be a dict with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise ConversationError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = message.get("content")
        calls = message.get("tool_calls") or []
        if calls and role != "assistant":
            raise ConversationError(f"{where}: only assistant messages may have tool_calls, not {role}")
        text = _text_of(content, role) if content is not None or role != "assistant" else ""
        if text is None:
            raise ConversationError(
                f"{where}: {role} content must be a string or a list of text blocks, got {type(content).__name__}"
            )
        if pending and role != "tool":
            raise ConversationError(
                f"{where}: {role} message after a tool call that has no result; answer each tool call with a "
                "tool message"
            )
        if role == "system":
            if i != 0:
                raise ConversationError(f"{where}: a system message is only allowed as the first message")
        elif role == "user":
            if prev == "user":
                raise ConversationError(f"{where}: two user messages in a row; user and assistant must alternate")
        elif role == "assistant":
            if prev == "":
                raise ConversationError(
                    f"{where}: the conversation must start with a user message (after an "
                    "optional system message), not an assistant message"
                )
            if prev == "assistant":
                raise ConversationError(f"{where}: two assistant messages in a row; user and assistant must alternate")
            pending = _check_tool_calls(calls, where)
            replied = True
        else:  # tool
            if prev not in ("assistant", "tool") or pending == 0:
                raise ConversationError(
                    f"{where}: a tool output without a call; a tool message must answer a tool call of the "
                    "assistant message before it"
                )
            pending -= 1
        if not text.strip() and role != "tool" and not calls:
            raise ConversationError(f"{where}: empty {role} content")
        if role != "system":
            prev = role
    if pending:
        raise ConversationError(f"{at}: ends with a tool call that has no result; answer it with a tool message")
    if not replied:
        raise ConversationError(f"{at}: no assistant reply; a conversation needs a user message and a reply")
    if prev == "user":
        raise ConversationError(f"{at}: ends with a user message that has no assistant reply")


def normalize_messages(messages: list[dict]) -> list[dict]:
    """`messages` in the shared schema: string content (text blocks joined), tool_calls present (None if none)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # text blocks; validate_messages allowed nothing else here
            content = "".join(p["text"] for p in content)
        calls = m.get("tool_calls") or None
        if calls:
            calls = [_struct_call(c) for c in calls]
        out.append({"role": m["role"], "content": content if content is not None else "", "tool_calls": calls})
    return out


def _struct_call(call: dict) -> dict:
    fn = call["function"]
    args = fn["arguments"]
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            args = {"code": args}  # the template renders a bare string as the code itself
    code = args.get("code", args.get("expression")) if isinstance(args, dict) else None
    if not isinstance(code, str):
        raise ConversationError(
            f"tool call {fn['name']!r}: only python tool calls (arguments {{'code': ...}}) fit the shared schema"
        )
    return tool_call(code)


# ---------------------------------------------------------------------------------------------------------------
# Building datasets


def conversations_dataset(rows: list[dict], extra: dict[str, Any] | None = None) -> datasets.Dataset:
    """A Dataset from rows holding `messages` (already valid) and the columns named in `extra` (name -> feature)."""
    features = Features({"messages": MESSAGES, **(extra or {})})
    columns = {name: [r[name] for r in rows] for name in features}
    columns["messages"] = [normalize_messages(m) for m in columns["messages"]]
    return datasets.Dataset.from_dict(columns, features=features)


def convert(
    source: datasets.Dataset,
    dataset: str,
    to_row: Callable[[dict, int], dict],
    extra: dict[str, Any] | None = None,
) -> datasets.Dataset:
    """Map every source row to a conversation row with `to_row(row, index)` and validate its messages.

    `to_row` raises ConversationError (with `dataset` and the row index) for a row it cannot convert."""
    features = Features({"messages": MESSAGES, **(extra or {})})

    def batch(rows: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {name: [] for name in features}
        for k, index in enumerate(indices):
            row = to_row({name: values[k] for name, values in rows.items()}, index)
            validate_messages(row["messages"], dataset, index)
            row["messages"] = normalize_messages(row["messages"])
            for name in features:
                out[name].append(row[name])
        return out

    return source.map(
        batch,
        batched=True,
        with_indices=True,
        remove_columns=source.column_names,
        features=features,
        desc=f"{dataset}: to messages",
    )


def require_columns(source: datasets.Dataset, columns: Iterable[str], dataset: str, origin: str) -> None:
    missing = [c for c in columns if c not in source.column_names]
    if missing:
        raise ValueError(
            f"{dataset} ({origin}): missing column(s) {missing}; found {source.column_names}. The data must have "
            f"the schema of the Hub dataset ({', '.join(columns)})"
        )


# ---------------------------------------------------------------------------------------------------------------
# Loading a Hub dataset, or a local copy of one

_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


def load_source(repo_id: str, config: str | None, split: str, path: str | os.PathLike | None) -> datasets.Dataset:
    """One split of a Hub dataset: `repo_id` (with `config`) through `datasets`, or the local `path`.

    `path` is a data file (used whole as the split), or a folder laid out like the Hub repo: files named
    `<split>-*.parquet` / `<split>.jsonl` (any depth) under `path/<config>/` when that folder exists, else under
    `path`. With HF_HUB_OFFLINE=1 a `repo_id` is read from its snapshot in the Hub cache (as `hf download` leaves it).
    """
    if path is not None:
        return _load_local(Path(path), config, split, f"{repo_id} from {path}")
    from huggingface_hub import constants, snapshot_download

    if constants.is_offline_mode():
        try:
            snapshot = snapshot_download(repo_id, repo_type="dataset")
        except Exception as err:  # LocalEntryNotFoundError and friends: say what to do about it
            raise ValueError(
                f"{repo_id}: offline (HF_HUB_OFFLINE=1) and no snapshot of this dataset in the Hub cache "
                f"{constants.HF_HUB_CACHE} ({type(err).__name__}); run `hf download {repo_id} --repo-type dataset` "
                "while online, or pass path= to a local copy"
            ) from None
        return _load_local(Path(snapshot), config, split, f"{repo_id} (Hub cache)")
    return datasets.load_dataset(repo_id, config, split=split)


def _load_local(path: Path, config: str | None, split: str, origin: str) -> datasets.Dataset:
    if path.is_file():
        files = [path]
    elif path.is_dir():
        root = path / config if config and (path / config).is_dir() else path
        files = sorted(
            f
            for f in root.rglob("*")
            if f.is_file() and f.suffix in _BUILDERS and (f.stem == split or f.name.startswith(f"{split}-"))
        )
        if not files:
            found = sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.suffix in _BUILDERS)
            raise FileNotFoundError(
                f"{origin}: no files for split {split!r} under {root} (expected {split}-*.parquet, {split}.jsonl "
                f"or similar); data files found: {found or 'none'}"
            )
    else:
        raise FileNotFoundError(f"{origin}: no such file or folder {path}")
    builders = {_BUILDERS.get(f.suffix) for f in files}
    if None in builders or len(builders) != 1:
        raise ValueError(f"{origin}: expected .parquet or .jsonl files of one kind, got {[f.name for f in files]}")
    return datasets.load_dataset(builders.pop(), data_files=[str(f) for f in files], split="train")
