"""Conversations as token ids: rendering through the chat template (nanochat-spec.md §3.1) and packing for
midtraining (§4.3).

**Rendering.** The tokenizer's chat template renders the Hugging Face ``messages`` format into nanochat's special
tokens and marks with ``{% generation %}`` exactly the tokens nanochat trains on, so
``apply_chat_template(..., return_assistant_tokens_mask=True)`` gives nanochat's ``render_conversation`` (ids, mask)
pair. The same call is what TRL's ``SFTTrainer`` makes, so midtraining and SFT see identical tokens.

**Packing** (midtraining): nanochat's BOS-aligned best fit with padding. Every conversation starts with ``<|bos|>``;
a row of T+1 tokens is filled by repeatedly taking the largest buffered conversation that fits entirely; when none
fits, the rest of the row is padded with ``<|bos|>`` whose targets are masked. Nothing is cropped: conversations are
truncated to T+1 tokens when rendered. Targets are ``row[1:]``, ALREADY SHIFTED as in the pretraining stream; they
are -100 on padding and, with ``assistant_only=True``, wherever nanochat's mask is 0 (nanochat's original
midtraining trained on every token of the conversation, so the default keeps them all).

The same rule is HEAD's SFT loader (chat_sft.py's ``sft_data_generator_bos_bestfit``, with the mask on):
:func:`pack_conversations` writes its rows as a dataset that TRL's ``SFTTrainer`` trains on.

Documents in one packed row attend to each other, as in nanochat's midtraining and HEAD's SFT (varlen attention was
rejected there); the 2025 pipeline's SFT does not pack at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from datasets import Dataset, Features, Sequence, Value
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


class ConversationRenderError(ValueError):
    """A conversation the chat template cannot render; the message names the row and the template's reason."""


def render_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_tokens: int | None = 2048
) -> tuple[list[int], list[int]]:
    """nanochat's ``render_conversation``: token ids and the training mask (1 = trained), truncated to
    `max_tokens` (None: no truncation)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if max_tokens is not None:
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return ids, mask


def render_dataset(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_tokens: int | None = 2048, num_proc: int | None = None,
    name: str = "conversations",
) -> Dataset:
    """`dataset` (a ``messages`` column) rendered to columns ``input_ids`` and ``mask``; other columns dropped."""
    if "messages" not in dataset.column_names:
        raise ConversationRenderError(
            f"{name}: no 'messages' column (columns: {dataset.column_names}); conversations must be in the Hugging "
            "Face messages format"
        )

    def render(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        ids, masks = [], []
        for row, messages in zip(indices, batch["messages"], strict=True):
            try:
                i, m = render_conversation(tokenizer, messages, max_tokens)
            except TemplateError as err:
                raise ConversationRenderError(f"{name}, row {row}: {err}") from None
            ids.append(i)
            masks.append(m)
        return {"input_ids": ids, "mask": masks}

    return dataset.map(render, batched=True, with_indices=True, remove_columns=dataset.column_names,
                       num_proc=num_proc, desc=f"rendering {name}")


def count_tokens(rendered: Dataset) -> int:
    return sum(len(ids) for ids in rendered["input_ids"])


class ConversationStream:
    """This rank's midtraining batches from a rendered dataset: ``{"input_ids": LongTensor(B, T), "labels":
    LongTensor(B, T)}`` with ALREADY-SHIFTED labels, the batch contract of :class:`PretrainStream`.

    Rank r reads rows ``r, r + world, ...`` in dataset order (the mixture is shuffled when it is built).
    ``loop=True`` starts another epoch when the shard runs out; otherwise iteration ends with a last, padded
    batch. ``max_batches`` stops after that many batches in total. :meth:`state_dict` (JSON-serialisable) holds the
    epoch, the cursor and the buffered row indices, so a resumed run continues with the very same batches.
    """

    def __init__(self, rendered: Dataset, *, seq_len: int, batch_size: int, bos_token_id: int, rank: int = 0,
                 world_size: int = 1, assistant_only: bool = False, buffer_size: int = 100, loop: bool = True,
                 max_batches: int | None = None):
        if len(rendered) < world_size:
            raise ValueError(f"{len(rendered)} conversations cannot be shared by {world_size} processes")
        self.rendered = rendered
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.bos = bos_token_id
        self.assistant_only = assistant_only
        self.buffer_size = buffer_size
        self.loop = loop
        self.max_batches = max_batches
        self.shard = list(range(rank, len(rendered), world_size))
        self.epoch, self.cursor, self.batches = 0, 0, 0
        self.buffer: list[tuple[int, list[int], list[int]]] = []  # (row, ids, mask)

    # --- state ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "batches": self.batches,
                "buffer": [row for row, _, _ in self.buffer]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.cursor, self.batches = state["epoch"], state["cursor"], state["batches"]
        self.buffer = [self._fetch(row) for row in state["buffer"]]

    # --- packing -------------------------------------------------------------------------------------------------
    def _fetch(self, row: int) -> tuple[int, list[int], list[int]]:
        item = self.rendered[row]
        capacity = self.seq_len + 1
        return row, item["input_ids"][:capacity], item["mask"][:capacity]

    def _refill(self) -> bool:
        """Top the buffer up; False when the data is exhausted (not looping) and nothing was added."""
        added = False
        while len(self.buffer) < self.buffer_size:
            if self.cursor == len(self.shard):
                if not self.loop:
                    break
                self.epoch, self.cursor = self.epoch + 1, 0
            self.buffer.append(self._fetch(self.shard[self.cursor]))
            self.cursor += 1
            added = True
        return added or bool(self.buffer)

    def _next_row(self) -> tuple[list[int], list[int]] | None:
        """One row of T+1 tokens and its per-token train flags (padding 0), or None when the data is exhausted."""
        capacity = self.seq_len + 1
        ids: list[int] = []
        train: list[int] = []
        while len(ids) < capacity:
            if not self._refill():
                break
            room = capacity - len(ids)
            best, best_len = None, 0
            for i, (_, conv, _) in enumerate(self.buffer):
                if best_len < len(conv) <= room:
                    best, best_len = i, len(conv)
            if best is None:
                break  # nothing fits: pad the rest of the row
            _, conv, mask = self.buffer.pop(best)
            ids.extend(conv)
            train.extend(mask if self.assistant_only else [1] * len(conv))
        if not ids:
            return None
        pad = capacity - len(ids)
        return ids + [self.bos] * pad, train + [0] * pad

    def rows(self) -> Iterator[tuple[list[int], list[int]]]:
        """Every packed row of T+1 token ids with its per-token train flags (1 = trained; padding 0), in order,
        until the data runs out (or forever when looping)."""
        while (row := self._next_row()) is not None:
            yield row

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self.max_batches is None or self.batches < self.max_batches:
            rows = []
            for _ in range(self.batch_size):
                row = self._next_row()
                if row is None:
                    break
                rows.append(row)
            if not rows:
                return
            while len(rows) < self.batch_size:  # the last batch of a finite stream: fully masked filler rows
                rows.append(([self.bos] * (self.seq_len + 1), [0] * (self.seq_len + 1)))
            ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
            train = torch.tensor([r[1] for r in rows], dtype=torch.bool)
            labels = ids[:, 1:].masked_fill(~train[:, 1:], IGNORE_INDEX)
            self.batches += 1
            yield {"input_ids": ids[:, :-1], "labels": labels}


def pack_conversations(rendered: Dataset, *, seq_len: int, bos_token_id: int, buffer_size: int = 100) -> Dataset:
    """`rendered` (columns ``input_ids``, ``mask``) packed by the BOS-aligned best-fit rule into rows of
    `seq_len` + 1 tokens: columns ``input_ids`` and ``assistant_masks`` (nanochat's mask; 0 on the BOS padding).
    One pass, in the dataset's order; every conversation lands in exactly one row."""
    # written to Arrow row by row (a GPU tier's mixture packs into ~10^5 rows of 2,049 ids); cached by the
    # rendered dataset's fingerprint and the settings, so every rank and every re-run reads the same rows
    features = Features({"input_ids": Sequence(Value("int32")), "assistant_masks": Sequence(Value("int8"))})
    return Dataset.from_generator(_packed_rows, features=features, gen_kwargs=dict(
        rendered=rendered, seq_len=seq_len, bos_token_id=bos_token_id, buffer_size=buffer_size))


def _packed_rows(rendered: Dataset, seq_len: int, bos_token_id: int, buffer_size: int) -> Iterator[dict]:
    stream = ConversationStream(rendered, seq_len=seq_len, batch_size=1, bos_token_id=bos_token_id,
                                assistant_only=True, buffer_size=buffer_size, loop=False)
    for ids, train in stream.rows():
        yield {"input_ids": ids, "assistant_masks": train}


def collate_packed_rows(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """A micro-batch of packed rows as nanochat's SFT feeds its model: inputs ``row[:-1]``, targets ``row[1:]``
    (ALREADY SHIFTED, under transformers' name ``shift_labels``) set to -100 where the mask of the target is 0.
    ``position_ids`` are plain 0..T-1 (no per-document reset: conversations in a row attend to each other)."""
    ids = torch.tensor([row["input_ids"] for row in rows], dtype=torch.long)
    train = torch.tensor([row["assistant_masks"] for row in rows], dtype=torch.bool)
    inputs = ids[:, :-1]
    return {
        "input_ids": inputs,
        "shift_labels": ids[:, 1:].masked_fill(~train[:, 1:], IGNORE_INDEX),
        "position_ids": torch.arange(inputs.shape[1]).expand_as(inputs),
    }
