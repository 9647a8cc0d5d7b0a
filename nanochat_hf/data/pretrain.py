"""Pretraining data: a text stream, tokenized in DataLoader workers, packed into BOS-aligned rows (nanochat-spec.md
§4.1-4.2).

Entry points: :class:`PretrainStream` (a source name and split in, batches out, with ``state_dict``), the
lower-level :func:`open_text_stream` / :class:`PackedBatches`. Where the text comes from is :mod:`nanochat_hf.data.sources`. The pipeline, one stage
feeding the next:

    open_text_stream ─► split_dataset_by_node ─► DataLoader workers ─► DocumentFeed ─► BestFitPacker ─► batches
    (datasets, streaming)  (this rank's share)     (read + tokenize)     (fixed order)    (rows of T+1)

Parquet takes a path of its own to the workers, :meth:`TextSource.open_row_groups` (this rank's row groups, read as
nanochat reads them), so that chunks of documents end where row groups end.

**Batches** (the contract with the Trainer): each step yields ``{"input_ids": LongTensor(B, T), "labels":
LongTensor(B, T)}`` cut from rows of T+1 tokens: ``input_ids = row[:, :-1]`` and ``labels = row[:, 1:]``. The labels
are ALREADY SHIFTED (:data:`LABELS_ARE_SHIFTED`): ``labels[b, t]`` is the target of ``input_ids[b, t]``. Do not hand
them to a loss that shifts again (transformers' causal-LM loss does, unless called with ``shift_labels=labels``).
There is no padding and no -100: every label is a real token, BOS targets included, as in nanochat.

**Packing** is nanochat's best fit: every document gets ``<|bos|>`` prepended; a buffer of at least 1000 documents
is kept; a row is filled by repeatedly taking the largest document that fits entirely, and when none fits, the
shortest one cropped to fill the row exactly. So every row starts with BOS and is 100% used. The cropped
remainder is discarded, exactly as nanochat does (a document longer than T+1 tokens therefore only ever
contributes its first T+1 tokens).

**Reading, as nanochat's loader reads** (nanochat/dataloader.py). Parquet: rank r of W reads, file after file, the
row groups r, r + W, r + 2W, ... of each file; each row group is read whole and cut into chunks of 128 documents
(``tokenizer_batch_size``) from its start, so a chunk never spans two row groups and a row group's last chunk is
shorter (300 documents: 128, 128, 44). The packer's buffer is topped up one chunk at a time, before each pick, until
it holds ``buffer_size`` documents. With one rank and ``num_workers=0`` the batches therefore equal nanochat's, batch
for batch (tested against a restatement of its rule, and against its own code when a checkout is at hand). Other
formats are streams of documents, cut into chunks of 128 consecutive documents, shared out across ranks by
``datasets``.

**Workers.** Each DataLoader worker reads a disjoint set of shards (``datasets`` deals them out in turn) and
tokenizes a chunk per call with the fast tokenizer. A local parquet row group is a shard of its own, a Hub parquet
file is one shard, and a jsonl or txt file is one; a document stream with fewer shards than workers is first
resharded where ``datasets`` can; if that is still too few, fewer workers are used. The main process takes chunks
from the workers in a strict round robin of its own, so the document order does not depend on timing (it does
depend on the number of workers, which decides how shards are dealt out: only ``num_workers=0`` keeps nanochat's
order).

**Resume.** :meth:`PackedBatches.state_dict` is JSON-serialisable and holds, per worker, the position after the
last chunk the main process consumed (the ``datasets`` stream state, and how many documents into the next row
group that chunk reached), whether that worker's share is finished, the round-robin
position, the epoch, and the packer's buffer. Loading it restarts each worker at its saved position, so chunks that
were prefetched but never consumed are read again and the batches continue bit-exactly; nothing consumed before is
re-tokenized. Resume needs the same ``num_workers``, rank and world size.

**Bad input** raises :class:`PretrainDataError` in the main process, naming the source and, for local files, the
file and row (or byte offset) at fault.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import IterableDataset
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader, get_worker_info
from transformers import PreTrainedTokenizerBase

from .sources import PretrainDataError, TextSource, _normalize_split, resolve_source

logger = logging.getLogger(__name__)

LABELS_ARE_SHIFTED = True


# ---------------------------------------------------------------------------------------------------------------
# Workers: read a disjoint share of the stream and tokenize it


@dataclass
class _WorkerItem:
    """What a worker sends: a chunk of tokenized documents with the stream state after its last document, an end
    marker (docs and failure both None), or a failure description."""

    worker: int
    docs: list[list[int]] | None = None
    state: dict | None = None
    failure: str | None = None


class _BadRow(Exception):
    pass


def _identity(item: Any) -> Any:
    # DataLoader's default conversion would walk every token list; the chunks are already plain Python.
    return item


class _TokenizingWorkers(torch.utils.data.IterableDataset):
    """Run by each DataLoader worker (or in-process with num_workers=0): read this worker's shards from its saved
    position, tokenize chunks of `batch_size` documents (BOS prepended), send them, then an end marker. Errors
    are sent as a failure item, so the main process can raise a readable one.

    Chunks are cut as nanochat cuts them: documents are read in groups, and each group is cut into chunks of
    `batch_size` from its start, so a chunk never spans two groups and a group's last chunk may be shorter. With
    `grouped` every example of the stream is a group (a parquet row group: ``{text_column: [documents]}``);
    otherwise the examples are documents, grouped `batch_size` at a time. A chunk's resume state is ``{"stream":
    the datasets state, "skip": documents of the next group already sent}``: the state after its group when it
    ends the group, else the state before the group and how far into it the chunk reached."""

    def __init__(
        self,
        texts: IterableDataset,
        tokenizer: PreTrainedTokenizerBase,
        text_column: str,
        batch_size: int,
        start_states: list[dict | None],
        done: list[bool],
        grouped: bool = False,
    ):
        self.texts = texts
        self.tokenizer = tokenizer
        self.text_column = text_column
        self.batch_size = batch_size
        self.start_states = start_states
        self.done = done
        self.grouped = grouped

    def __iter__(self) -> Iterator[_WorkerItem]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if self.done[worker]:
            yield _WorkerItem(worker)
            return
        # A worker owns a copy of the dataset; in-process, copy it so the caller's object keeps no position.
        texts = self.texts if info is not None else copy.deepcopy(self.texts)
        start = self.start_states[worker] or {"stream": None, "skip": 0}
        if start["stream"] is not None:
            texts.load_state_dict(start["stream"])
        before, skip = start["stream"], start["skip"]
        try:
            for docs, after in self._groups(texts, worker):
                for begin in range(skip, len(docs), self.batch_size):
                    end = min(begin + self.batch_size, len(docs))
                    resume = {"stream": after, "skip": 0} if end == len(docs) else {"stream": before, "skip": end}
                    yield self._encode(worker, docs[begin:end], resume)
                before, skip = after, 0
        except Exception as err:  # reported, with its type, by the main process
            yield _WorkerItem(worker, failure=f"{type(err).__name__}: {err}")
            return
        yield _WorkerItem(worker)

    def _groups(self, texts: IterableDataset, worker: int) -> Iterator[tuple[list[str], dict]]:
        """This worker's documents group by group, each with the stream's state after it."""
        read = 0
        if self.grouped:
            for row in texts:
                docs = row[self.text_column]  # open_row_groups always gives a list
                for doc in docs:
                    self._check(doc, read, worker, row)
                    read += 1
                yield docs, texts.state_dict()
            return
        pending: list[str] = []
        for row in texts:
            text = row.get(self.text_column)
            self._check(text, read, worker, row)
            pending.append(text)
            read += 1
            if len(pending) == self.batch_size:
                yield pending, texts.state_dict()
                pending = []
        if pending:
            yield pending, texts.state_dict()

    def _check(self, text: Any, read: int, worker: int, row: Mapping[str, Any]) -> None:
        if not isinstance(text, str):
            found = "no such column" if self.text_column not in row else type(text).__name__
            raise _BadRow(f"document {read} of worker {worker}'s share: column {self.text_column!r}: {found}")

    def _encode(self, worker: int, texts: list[str], state: dict) -> _WorkerItem:
        # nanochat encodes special-token strings in text as ordinary text (tiktoken's encode_ordinary): what
        # `tokenizer(texts, split_special_tokens=True)` does, through the Rust backend's batch call that skips the
        # offsets nobody reads here (a third less time per batch of documents).
        backend = self.tokenizer.backend_tokenizer
        literal = backend.encode_special_tokens
        backend.encode_special_tokens = True
        try:
            encodings = backend.encode_batch_fast(texts, add_special_tokens=False)
        finally:
            backend.encode_special_tokens = literal
        bos = self.tokenizer.bos_token_id
        return _WorkerItem(worker, docs=[[bos, *e.ids] for e in encodings], state=state)


# ---------------------------------------------------------------------------------------------------------------
# The document feed: chunks of tokenized documents in a fixed order, with the state to resume it


@dataclass
class _FeedState:
    epoch: int = 0
    next_worker: int = 0
    worker_states: list[dict | None] = field(default_factory=list)
    worker_done: list[bool] = field(default_factory=list)
    docs_consumed: list[int] = field(default_factory=list)  # this epoch, per worker


class DocumentFeed:
    """Tokenized documents of one rank's text stream, one chunk at a time, taken from the workers in a strict
    round robin; resumable from :meth:`state_dict`. With `loop`, a new epoch starts when every worker's share is
    exhausted (workers are restarted); otherwise the feed ends. `grouped`: the stream's examples are groups of
    documents (parquet row groups, :meth:`TextSource.open_row_groups`) that no chunk may span."""

    def __init__(
        self,
        texts: IterableDataset,
        tokenizer: PreTrainedTokenizerBase,
        *,
        text_column: str = "text",
        num_workers: int = 0,
        tokenizer_batch_size: int = 128,
        loop: bool = True,
        describe: str = "the text stream",
        diagnose: Callable[[], str | None] | None = None,
        grouped: bool = False,
    ):
        if tokenizer.bos_token_id is None:
            raise ValueError("the tokenizer has no BOS token; nanochat's <|bos|> starts every document")
        self.texts = texts
        self.tokenizer = tokenizer
        self.text_column = text_column
        self.num_workers = num_workers
        self.num_streams = max(1, num_workers)  # num_workers=0 reads in-process as one stream
        self.tokenizer_batch_size = tokenizer_batch_size
        self.loop = loop
        self.describe = describe
        self.diagnose = diagnose
        self.grouped = grouped
        self._state = self._fresh_state(epoch=0)

    def _fresh_state(self, epoch: int) -> _FeedState:
        n = self.num_streams
        return _FeedState(epoch, 0, [None] * n, [False] * n, [0] * n)

    @property
    def epoch(self) -> int:
        return self._state.epoch

    def state_dict(self) -> dict:
        s = self._state
        return copy.deepcopy(
            {
                "epoch": s.epoch,
                "next_worker": s.next_worker,
                "worker_states": s.worker_states,
                "worker_done": s.worker_done,
                "docs_consumed": s.docs_consumed,
            }
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if len(state["worker_states"]) != self.num_streams:
            raise ValueError(
                f"the saved feed read {len(state['worker_states'])} worker streams, this one reads "
                f"{self.num_streams}: resume with the same num_workers (and rank/world size)"
            )
        self._state = _FeedState(**copy.deepcopy(dict(state)))

    def chunks(self) -> Iterator[list[list[int]]]:
        """Chunks of documents (each a list of token ids starting with BOS). A chunk counts as consumed, and the
        state moves past it, when it is yielded."""
        while True:
            if not all(self._state.worker_done):
                yield from self._epoch_chunks()
            if sum(self._state.docs_consumed) == 0:
                raise PretrainDataError(f"{self.describe}: no documents")
            if not self.loop:
                return
            self._state = self._fresh_state(self._state.epoch + 1)

    def _epoch_chunks(self) -> Iterator[list[list[int]]]:
        s = self._state
        workers = _TokenizingWorkers(
            self.texts,
            self.tokenizer,
            self.text_column,
            self.tokenizer_batch_size,
            list(s.worker_states),
            list(s.worker_done),
            self.grouped,
        )
        loader = DataLoader(workers, batch_size=None, num_workers=self.num_workers, collate_fn=_identity)
        items = iter(loader)
        # Items from workers other than the one whose turn it is wait here; the DataLoader already returns them
        # round robin, so this holds at most about one item per worker.
        waiting: list[deque[_WorkerItem]] = [deque() for _ in range(self.num_streams)]
        try:
            while not all(s.worker_done):
                w = s.next_worker
                s.next_worker = (w + 1) % self.num_streams
                if s.worker_done[w]:
                    continue
                while not waiting[w]:
                    item = next(items, None)
                    if item is None:
                        raise RuntimeError(f"DataLoader worker {w} stopped without an end marker")
                    waiting[item.worker].append(item)
                item = waiting[w].popleft()
                if item.failure is not None:
                    raise PretrainDataError(self._explain(item))
                if item.docs is None:
                    s.worker_done[w] = True
                    continue
                s.worker_states[w] = item.state
                s.docs_consumed[w] += len(item.docs)
                yield item.docs
        finally:
            del items  # shuts the workers down now rather than at garbage collection

    def _explain(self, item: _WorkerItem) -> str:
        located = self.diagnose() if self.diagnose is not None else None
        if located is not None:
            return f"{self.describe}: {located}"
        return f"{self.describe}: DataLoader worker {item.worker} could not read a document: {item.failure}"


# ---------------------------------------------------------------------------------------------------------------
# Best-fit packing


class BestFitPacker:
    """nanochat's BOS-aligned best-fit packing (bos_bestfit): keep at least `buffer_size` documents buffered; fill
    a row by taking the largest document that fits entirely (the first in buffer order among equals), and when none
    fits, the shortest one (first among equals) cropped to fill the row exactly. The cropped tail is dropped."""

    def __init__(self, buffer_size: int = 1000):
        self.buffer_size = buffer_size
        self.buffer: list[list[int]] = []

    def next_row(self, capacity: int, refill: Callable[[], list[list[int]] | None]) -> list[int] | None:
        """A row of exactly `capacity` tokens, or None when `refill` (returns the next chunk of documents, None
        once there are no more) runs dry before the row is full."""
        row: list[int] = []
        while len(row) < capacity:
            while len(self.buffer) < self.buffer_size:
                docs = refill()
                if docs is None:
                    break
                self.buffer.extend(docs)
            if not self.buffer:
                return None
            remaining = capacity - len(row)
            index = self._largest_fitting(remaining)
            if index is None:
                index = min(range(len(self.buffer)), key=lambda i: len(self.buffer[i]))
            row.extend(self.buffer.pop(index)[:remaining])
        return row

    def _largest_fitting(self, room: int) -> int | None:
        best, best_len = None, 0
        for i, doc in enumerate(self.buffer):
            if best_len < len(doc) <= room:
                best, best_len = i, len(doc)
        return best


# ---------------------------------------------------------------------------------------------------------------
# Batches


def _distributed_position(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        found = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:  # torchrun / accelerate launch set these before the process group exists
        found = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return (found[0] if rank is None else rank), (found[1] if world_size is None else world_size)


class PackedBatches(torch.utils.data.IterableDataset):
    """This rank's pretraining batches: ``{"input_ids": LongTensor(B, T), "labels": LongTensor(B, T)}`` with the
    labels ALREADY SHIFTED (``labels = row[:, 1:]``, ``input_ids = row[:, :-1]`` of BOS-aligned rows of T+1).

    `source` is a :class:`TextSource` (its local files are scanned to explain bad input) or any ``datasets``
    IterableDataset of documents. `rank`/`world_size` default to torch.distributed's (or RANK/WORLD_SIZE).
    `loop=True` repeats epochs forever (train); `max_batches` stops after that many batches in total, counted
    across resumes. Iterating continues from the current state; one iteration at a time. Each rank saves and loads
    its own :meth:`state_dict`. It is already batched and already this rank's share: iterate it directly, or wrap it
    in ``DataLoader(stream, batch_size=None, num_workers=0)`` without letting Accelerate shard it again.
    """

    def __init__(
        self,
        source: TextSource | IterableDataset,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int,
        seq_len: int,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        buffer_size: int = 1000,
        tokenizer_batch_size: int = 128,
        loop: bool = True,
        max_batches: int | None = None,
        text_column: str = "text",
    ):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = _distributed_position(rank, world_size)
        self.max_batches = max_batches
        self.batches = 0
        if isinstance(source, TextSource):
            texts, text_column, describe = source.open(), source.text_column, source.describe()
            diagnose = source.find_problem
        else:
            texts, describe, diagnose = source, "the text stream", None
        if self.world_size > 1:
            describe += f" (rank {self.rank} of {self.world_size})"
        # Parquet is read as nanochat reads it, by row group (its rank's share of each file), so that chunks of
        # documents end where row groups end; other sources are streams of documents, shared out by datasets.
        grouped = isinstance(source, TextSource) and source.builder == "parquet"
        if grouped:
            texts = source.open_row_groups(self.rank, self.world_size)
        else:
            texts = self._share(texts, num_workers)
        if num_workers > texts.num_shards:
            logger.warning(
                "%d DataLoader workers requested but this rank's stream has only %d shards; using %d",
                num_workers,
                texts.num_shards,
                texts.num_shards,
            )
            num_workers = texts.num_shards
        self.feed = DocumentFeed(
            texts,
            tokenizer,
            text_column=text_column,
            num_workers=num_workers,
            tokenizer_batch_size=tokenizer_batch_size,
            loop=loop,
            describe=describe,
            diagnose=diagnose,
            grouped=grouped,
        )
        self.packer = BestFitPacker(buffer_size)

    def _share(self, texts: IterableDataset, num_workers: int) -> IterableDataset:
        """This rank's part of a document stream, in at least as many shards as workers where it can be split
        (each worker needs a shard of its own)."""
        if texts.num_shards < self.world_size * max(1, num_workers):
            texts = texts.reshard()  # a parquet IterableDataset: one shard per row group; other formats per file
        if self.world_size > 1:
            texts = split_dataset_by_node(texts, rank=self.rank, world_size=self.world_size)
        return texts

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        chunks = self.feed.chunks()

        def refill() -> list[list[int]] | None:
            return next(chunks, None)

        try:
            while self.max_batches is None or self.batches < self.max_batches:
                rows = []
                for _ in range(self.batch_size):
                    row = self.packer.next_row(self.seq_len + 1, refill)
                    if row is None:
                        return
                    rows.append(row)
                rows_t = torch.tensor(rows, dtype=torch.long)  # (B, T+1)
                self.batches += 1
                yield {"input_ids": rows_t[:, :-1].contiguous(), "labels": rows_t[:, 1:].contiguous()}
        finally:
            chunks.close()

    def state_dict(self) -> dict:
        """JSON-serialisable state after the last batch yielded (see the module docstring)."""
        return {
            "format": 1,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.feed.num_workers,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "batches": self.batches,
            "feed": self.feed.state_dict(),
            "buffer": [list(doc) for doc in self.packer.buffer],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("rank", "world_size", "num_workers", "batch_size", "seq_len"):
            mine = self.feed.num_workers if key == "num_workers" else getattr(self, key)
            if state[key] != mine:
                raise ValueError(f"cannot resume: the saved stream has {key}={state[key]}, this one {mine}")
        self.feed.load_state_dict(state["feed"])
        self.packer.buffer = [list(doc) for doc in state["buffer"]]
        self.batches = state["batches"]


class PretrainStream(PackedBatches):
    """:class:`PackedBatches` for one split ("train" or "validation"/"val") of a source: a Hub dataset id, a local
    folder or file, a :class:`TextSource` or a ``datasets`` IterableDataset. The train split loops forever; the
    validation split is read once from its start (`loop` overrides), up to `max_batches` batches: set that from the
    evaluation token budget, ``eval_tokens // (batch_size * seq_len * world_size)``, and build a fresh stream for
    each evaluation so every one sees the same tokens. Other keyword arguments go to :class:`PackedBatches` (rank,
    world_size, num_workers, buffer_size, tokenizer_batch_size)."""

    def __init__(
        self,
        source: str | os.PathLike | TextSource | IterableDataset,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int,
        seq_len: int,
        split: str = "train",
        *,
        text_column: str = "text",
        loop: bool | None = None,
        max_batches: int | None = None,
        **kwargs: Any,
    ):
        split = _normalize_split(split)
        if isinstance(source, (str, os.PathLike)):
            source = resolve_source(source, split, text_column)
        super().__init__(
            source,
            tokenizer,
            batch_size,
            seq_len,
            loop=split == "train" if loop is None else loop,
            max_batches=max_batches,
            text_column=text_column,
            **kwargs,
        )
