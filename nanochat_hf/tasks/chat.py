"""Plain conversations: SmolTalk (HuggingFaceTB/smol-smoltalk) and the identity (personality) conversations."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets

from .common import ConversationError, conversations_dataset, convert, load_source, require_columns, validate_messages

SMOLTALK_REPO = "HuggingFaceTB/smol-smoltalk"  # nanochat: train 460K rows, test 24K
DEFAULT_IDENTITY = Path(__file__).resolve().parent.parent / "data" / "identity.jsonl"


def load_smoltalk(split: str = "train", path: str | os.PathLike | None = None) -> datasets.Dataset:
    """SmolTalk conversations as they are (a leading system message is kept; the chat template merges it into the
    first user message, as nanochat does)."""
    source = load_source(SMOLTALK_REPO, None, split, path)
    require_columns(source, ["messages"], "smoltalk", str(path or SMOLTALK_REPO))
    return convert(source, "smoltalk", lambda row, i: {"messages": row["messages"]})


def load_identity(path: str | os.PathLike | None = None) -> datasets.Dataset:
    """Identity conversations from a JSONL file: one conversation per line, either a JSON list of messages (the
    format of nanochat's identity_conversations.jsonl) or an object with a "messages" list. Defaults to the
    personality that ships with the package (nanochat_hf/data/identity.jsonl); pass your own file to change who
    the model says it is. Errors name the file and the line."""
    file = Path(path) if path is not None else DEFAULT_IDENTITY
    if not file.is_file():
        raise FileNotFoundError(f"identity: no such file {file}; pass a JSONL file with one conversation per line")
    rows = []
    with file.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConversationError(f"identity {file} line {lineno}: invalid JSON ({err.msg})") from None
            messages = item.get("messages") if isinstance(item, dict) else item
            validate_messages(messages, f"identity {file} line", lineno)
            rows.append({"messages": messages})
    if not rows:
        raise ConversationError(f"identity {file}: no conversations in this file")
    return conversations_dataset(rows)
