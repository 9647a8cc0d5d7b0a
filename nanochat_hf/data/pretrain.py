"""Pretraining data: a text stream, tokenized in DataLoader workers, packed into BOS-aligned rows (nanochat-spec.md
§4.1-4.2), plus bits per byte (§5.2).

Entry points: :class:`PretrainStream` (a source name and split in, batches out, with ``state_dict``), the
lower-level :func:`open_text_stream` / :class:`PackedBatches`, and :func:`evaluate_bpb`. The pipeline, one stage
feeding the next:

    open_text_stream ─► split_dataset_by_node ─► DataLoader workers ─► DocumentFeed ─► BestFitPacker ─► batches
    (datasets, streaming)  (this rank's share)     (read + tokenize)     (fixed order)    (rows of T+1)

Parquet takes a path of its own to the workers, :meth:`TextSource.open_row_groups` (this rank's row groups, read as
nanochat reads them), so that chunks of documents end where row groups end.

**Sources.** A Hub dataset id (default nanochat's ``karpathy/climbmix-400b-shuffle``) or a local folder or file of
``.parquet``, ``.jsonl`` or ``.txt`` files (a ``.txt`` file is one document), all read by ``datasets.load_dataset``
with ``streaming=True``. Splits: files whose path names a split (``train``, ``validation``/``valid``/``val``/``dev``;
``test``/``eval`` serves as validation when there is no validation file) keep it. Otherwise, as in nanochat, the
last file in sorted order is the validation split and the others are train. A source of one file holds out the
documents whose CRC-32 is divisible by 100 (about 1%): a hash of the text, not "every Nth row", because a row's
position depends on how shards are split across ranks and workers, and its text does not.

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

import contextlib
import copy
import json
import logging
import math
import os
import re
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from datasets import IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader, get_worker_info
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = "karpathy/climbmix-400b-shuffle"
LABELS_ARE_SHIFTED = True
HOLDOUT_ONE_IN = 100

_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".txt": "text"}
_SPLIT_WORDS = {
    "train": {"train", "training"},
    "validation": {"validation", "valid", "val", "dev"},
    "test": {"test", "testing", "eval", "evaluation"},
}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class PretrainDataError(ValueError):
    """The pretraining source cannot be read as documents; the message names the source and where it went wrong."""


# ---------------------------------------------------------------------------------------------------------------
# Sources and splits


@dataclass(frozen=True)
class TextSource:
    """One split of a text source, resolved to its files. ``files`` are local paths, or ``hf://`` URLs when
    streaming from the Hub; ``holdout`` is set when the split is a hash-partition of a single file."""

    name: str
    split: str
    text_column: str
    builder: str
    files: tuple[str, ...]
    holdout: bool = False
    local: bool = True

    def describe(self) -> str:
        held_out = f", the 1-in-{HOLDOUT_ONE_IN} hash hold-out of a single file" if self.holdout else ""
        return f"{self.name} [{self.split}{held_out}]"

    def open(self, streaming: bool = True) -> IterableDataset:
        """The split's documents as a ``datasets.IterableDataset`` holding (at least) the text column."""
        if self.builder == "text" and self.text_column != "text":
            raise PretrainDataError(
                f"{self.describe()}: .txt files give one document per file in a column named 'text'; "
                f"text_column={self.text_column!r} does not apply"
            )
        options = {"sample_by": "document"} if self.builder == "text" else {}
        data_files = {self.split: list(self.files)}
        try:
            ds = load_dataset(self.builder, data_files=data_files, split=self.split, streaming=streaming, **options)
        except Exception as err:  # datasets reads the first rows here (schema inference)
            problem = self.find_problem() or f"datasets could not open the files ({type(err).__name__}: {err})"
            raise PretrainDataError(f"{self.describe()}: {problem}") from err
        if not streaming:
            # Several shards, so DataLoader workers and ranks can share the rows.
            ds = ds.to_iterable_dataset(num_shards=max(1, min(len(ds), 64)))
        self._check_columns(ds)
        if ds.features is not None and len(ds.features) > 1:
            ds = ds.select_columns([self.text_column])
        if self.holdout:
            ds = ds.filter(_HashHoldout(self.text_column, validation=self.split == "validation"))
        return ds

    def open_row_groups(self, rank: int = 0, world_size: int = 1) -> IterableDataset:
        """A parquet split as this rank's row groups, one example each: ``{text_column: [its documents]}``, in
        nanochat's order: the files in order, and in each file the row groups rank, rank + world_size, ... (so the
        ranks share every file). Each local row group is a shard of its own (DataLoader workers deal them out); a
        remote file is one shard whose row groups are counted when it is read, since opening thousands of Hub files
        up front would take minutes. Call :meth:`open` first: it checks the text column."""
        if self.builder != "parquet":
            raise ValueError(f"{self.describe()}: row groups are a parquet notion; this source is {self.builder}")
        if self.local:
            shards = [
                (file, [group])
                for file in self.files
                for group in range(rank, pq.ParquetFile(file).metadata.num_row_groups, world_size)
            ]
            if not shards:
                raise PretrainDataError(
                    f"{self.describe()}: rank {rank} of {world_size} gets no row group (each rank reads every "
                    f"{world_size}th row group of each file); use fewer ranks or files with more row groups"
                )
        else:
            shards = [(file, None) for file in self.files]
        holdout = _HashHoldout(self.text_column, validation=self.split == "validation") if self.holdout else None
        gen_kwargs = {
            "files": [file for file, _ in shards],
            "row_groups": [groups for _, groups in shards],
            "column": self.text_column,
            "rank": rank,
            "world_size": world_size,
            "holdout": holdout,
        }
        return IterableDataset.from_generator(_read_row_groups, gen_kwargs=gen_kwargs)

    def _check_columns(self, ds: IterableDataset) -> None:
        # The schema is known up front for parquet and jsonl, so a wrong column fails here, before any worker starts.
        if ds.features is None:
            return
        if self.text_column not in ds.features:
            raise PretrainDataError(
                f"{self.describe()}: no column {self.text_column!r} in {self.files[0]}; the available columns are "
                f"{sorted(ds.features)}"
            )
        dtype = getattr(ds.features[self.text_column], "dtype", None)
        if dtype not in ("string", "large_string"):
            # e.g. datasets' Json type for a jsonl column mixing strings and numbers: point at a row if possible
            found = ds.features[self.text_column]
            problem = self.find_problem() or f"column {self.text_column!r} holds {found}, not text"
            raise PretrainDataError(f"{self.describe()}: {problem}")

    def find_problem(self) -> str | None:
        """Scan the split's local files for the first row that is not a readable document; None if all are fine
        (or the files are remote). Used only to explain a failure, never on the normal path."""
        if not self.local:
            return None
        for path in self.files:
            problem = _FILE_CHECKS[self.builder](Path(path), self.text_column)
            if problem is not None:
                return problem
        return None


@dataclass(frozen=True)
class _HashHoldout:
    """Filter for a single-file source: a document is validation iff crc32(text) % HOLDOUT_ONE_IN == 0."""

    column: str
    validation: bool

    def __call__(self, row: Mapping[str, Any]) -> bool:
        text = row[self.column]
        if not isinstance(text, str):
            return True  # let the worker see it and report the bad row, whichever split is read
        held_out = zlib.crc32(text.encode("utf-8", "surrogatepass")) % HOLDOUT_ONE_IN == 0
        return held_out == self.validation


def _read_row_groups(
    files: list[str],
    row_groups: list[list[int] | None],
    column: str,
    rank: int,
    world_size: int,
    holdout: _HashHoldout | None,
) -> Iterator[dict[str, list]]:
    """The ``datasets`` generator behind :meth:`TextSource.open_row_groups` (called with one shard's files and
    row groups): one example per row group, the `column` values of its rows. ``None`` row groups: the file's
    rank-th, (rank + world_size)-th, ... Values are passed on unchecked; the worker reports a bad one."""
    for file, groups in zip(files, row_groups, strict=True):
        with contextlib.ExitStack() as stack:
            # local paths are read by pyarrow natively, hf:// URLs through fsspec (huggingface_hub's filesystem)
            opened = file if "://" not in file else stack.enter_context(fsspec.open(file, "rb"))
            parquet = stack.enter_context(pq.ParquetFile(opened))
            if groups is None:
                groups = range(rank, parquet.num_row_groups, world_size)
            for group in groups:
                texts = parquet.read_row_group(group, columns=[column]).column(0).to_pylist()
                if holdout is not None:
                    texts = [text for text in texts if holdout({column: text})]
                yield {column: texts}


def resolve_source(
    source: str | os.PathLike = DEFAULT_SOURCE, split: str = "train", text_column: str = "text"
) -> TextSource:
    """Find the files of `split` ("train" or "validation"/"val") of a local folder/file or a Hub dataset id."""
    split = _normalize_split(split)
    name = os.fspath(source)
    path = Path(name).expanduser()
    if path.exists():
        files, local = _local_files(path), True
    elif _HUB_ID.match(name):
        files, local = _hub_files(name)
    else:
        raise PretrainDataError(f"{name}: no such file or folder, and not a Hub dataset id (owner/name)")
    if not files:
        raise PretrainDataError(f"{name}: no {', '.join(_BUILDERS)} files found")
    suffixes = sorted({_suffix(relative) for relative in files})
    if len(suffixes) > 1:
        raise PretrainDataError(f"{name}: mixes file types {suffixes}; use one of {', '.join(_BUILDERS)} per source")
    chosen, holdout = _split_files(list(files), split)
    if not chosen:
        raise PretrainDataError(f"{name}: no files for the {split!r} split (files: {list(files)})")
    builder = _BUILDERS[suffixes[0]]
    locations = [files[relative] for relative in chosen]
    if local and builder != "text":
        # datasets trips over files without rows (parquet: "BatchSize must be greater than 0"; jsonl: a bare
        # StopIteration), and they hold no documents anyway.
        locations = [f for f in locations if _has_rows(f, builder)]
        if not locations:
            raise PretrainDataError(f"{name} [{split}]: no documents (every file of the split is empty)")
    return TextSource(name, split, text_column, builder, tuple(locations), holdout, local)


def _has_rows(path: str, builder: str) -> bool:
    if builder == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows > 0  # reads the footer only
    with open(path, "rb") as f:
        return any(line.strip() for line in f)  # stops at the first row


def open_text_stream(
    source: str = DEFAULT_SOURCE, split: str = "train", text_column: str = "text", streaming: bool = True
) -> IterableDataset:
    """The documents of one split of `source` (Hub dataset id or local folder/file) as a ``datasets``
    IterableDataset with the text column. See the module docstring for how splits are chosen."""
    return resolve_source(source, split, text_column).open(streaming=streaming)


def _normalize_split(split: str) -> str:
    if split in ("validation", "val", "valid"):
        return "validation"
    if split == "train":
        return "train"
    raise ValueError(f"split must be 'train' or 'validation', got {split!r}")


def _suffix(file: str) -> str:
    return os.path.splitext(file)[1]


def _local_files(path: Path) -> dict[str, str]:
    """{path relative to the source (what split names are read from): path to open}, sorted."""
    if path.is_file():
        if path.suffix not in _BUILDERS:
            raise PretrainDataError(f"{path}: unsupported file type (expected {', '.join(_BUILDERS)})")
        return {path.name: str(path)}
    found = []
    for file in path.rglob("*"):
        relative = file.relative_to(path)
        if file.suffix in _BUILDERS and file.is_file() and not any(p.startswith(".") for p in relative.parts):
            found.append(relative.as_posix())
    return {relative: str(path / relative) for relative in sorted(found)}


def _hub_files(repo_id: str) -> tuple[dict[str, str], bool]:
    """Offline: the cached snapshot's files. Online: ``hf://`` URLs at the current commit, streamed (never the
    whole repo downloaded: ClimbMix is hundreds of GB)."""
    from huggingface_hub import HfApi, constants, snapshot_download

    if constants.is_offline_mode():
        try:
            snapshot = snapshot_download(repo_id, repo_type="dataset")
        except Exception as err:  # LocalEntryNotFoundError and friends: say what to do about it
            raise PretrainDataError(
                f"{repo_id}: offline (HF_HUB_OFFLINE=1) and no snapshot of this dataset in the Hub cache "
                f"{constants.HF_HUB_CACHE} ({type(err).__name__}); download it first or pass a local folder"
            ) from None
        return _local_files(Path(snapshot)), True
    try:
        info = HfApi().dataset_info(repo_id)
    except Exception as err:  # not found, no network, no access: one readable message with the cause attached
        raise PretrainDataError(
            f"{repo_id}: cannot list this dataset's files on the Hub ({type(err).__name__}: {err}); for a cached "
            "copy set HF_HUB_OFFLINE=1, or pass a local folder"
        ) from err
    names = sorted(
        s.rfilename
        for s in info.siblings or []
        if _suffix(s.rfilename) in _BUILDERS and not any(p.startswith(".") for p in s.rfilename.split("/"))
    )
    return {n: f"hf://datasets/{repo_id}@{info.sha}/{n}" for n in names}, False


def _split_tag(relative: str) -> str | None:
    words = set(re.split(r"[/._\-\s]+", os.path.splitext(relative)[0].lower()))
    for split in ("validation", "test", "train"):
        if words & _SPLIT_WORDS[split]:
            return split
    return None


def _split_files(files: list[str], split: str) -> tuple[list[str], bool]:
    """(the relative paths of `split`, whether it is a hash hold-out of a single file)."""
    tags = {f: _split_tag(f) for f in files}
    validation = [f for f in files if tags[f] == "validation"] or [f for f in files if tags[f] == "test"]
    if validation:
        train = [f for f in files if tags[f] == "train"] or [f for f in files if tags[f] is None]
        return (train if split == "train" else validation), False
    if len(files) == 1:
        return files, True
    # nanochat: the last shard (sorted) is validation, all the others are train.
    return (files[:-1] if split == "train" else files[-1:]), False


# Diagnosis of a failed read: the first bad row of a local file, with a position a person can look up.


def _check_text(value: Any, column: str) -> str | None:
    if value is None:
        return f"column {column!r} is null"
    if not isinstance(value, str):
        return f"column {column!r} holds {type(value).__name__}, not text"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"column {column!r} holds a lone surrogate at character {err.start}"
    return None


def _check_txt(path: Path, column: str) -> str | None:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        return f"{path}: not valid UTF-8 at byte offset {err.start} ({err.reason})"
    return None


def _check_jsonl(path: Path, column: str) -> str | None:
    row_index = 0
    offset = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"{path}: not valid UTF-8 at byte offset {offset + err.start} (line {lineno})"
            offset += len(raw)
            if not line.strip():
                continue
            where = f"{path}: row {row_index} (line {lineno})"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                return f"{where}: invalid JSON ({err.msg})"
            if not isinstance(row, dict):
                return f"{where}: a JSON {type(row).__name__}, not an object"
            if column not in row:
                return f"{where}: no column {column!r}; this row has {sorted(row)}"
            problem = _check_text(row[column], column)
            if problem is not None:
                return f"{where}: {problem}"
            row_index += 1
    return None


def _check_parquet(path: Path, column: str) -> str | None:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if column not in parquet.schema_arrow.names:
        return f"{path}: no column {column!r}; the file has columns {parquet.schema_arrow.names}"
    row_index = 0
    for batch in parquet.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            problem = _check_text(value, column)
            if problem is not None:
                return f"{path}: row {row_index}: {problem}"
            row_index += 1
    return None


_FILE_CHECKS: dict[str, Callable[[Path, str], str | None]] = {
    "text": _check_txt,
    "json": _check_jsonl,
    "parquet": _check_parquet,
}


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


# ---------------------------------------------------------------------------------------------------------------
# Bits per byte


@torch.no_grad()
def evaluate_bpb(
    model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], token_bytes: torch.Tensor
) -> float:
    """nanochat's bits per byte: the summed cross-entropy (nats) of every target whose token stands for at least
    one byte, over ln 2 times the number of those bytes. Targets that are negative (-100, or nanochat's -1) or
    special tokens (0 bytes) count in neither sum. `batches` hold ``input_ids`` and ALREADY-SHIFTED ``labels``
    (as :class:`PackedBatches` yields); the model is called with ``input_ids`` only. Sums are all-reduced across
    ranks when torch.distributed is initialised. Returns inf when no target has bytes. Put the model in eval mode
    first."""
    device = next(model.parameters()).device
    token_bytes = token_bytes.to(device=device, dtype=torch.long)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.long, device=device)
    for batch in batches:
        input_ids = batch["input_ids"].to(device)
        targets = batch["labels"].to(device).reshape(-1)
        logits = model(input_ids=input_ids).logits
        valid = targets >= 0
        safe_targets = targets.clamp(min=0)  # cross_entropy rejects negative ids; those are masked below anyway
        nats = F.cross_entropy(logits.float().reshape(targets.numel(), -1), safe_targets, reduction="none")
        nbytes = torch.where(valid, token_bytes[safe_targets], 0)
        total_nats += (nats.double() * (nbytes > 0)).sum()
        total_bytes += nbytes.sum()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total_nats)
        torch.distributed.all_reduce(total_bytes)
    n_bytes = int(total_bytes.item())
    if n_bytes == 0:
        return math.inf
    return total_nats.item() / (math.log(2) * n_bytes)
