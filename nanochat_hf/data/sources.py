"""Where pretraining text comes from: a Hub dataset id or local files, their train/validation split, and a
failed read diagnosed down to the file and row (nanochat-spec.md §4.1).

**Sources.** A Hub dataset id (default nanochat's ``karpathy/climbmix-400b-shuffle``) or a local folder or file of
``.parquet``, ``.jsonl`` or ``.txt`` files (a ``.txt`` file is one document), all read by ``datasets.load_dataset``
with ``streaming=True``. Splits: files whose path names a split (``train``, ``validation``/``valid``/``val``/``dev``;
``test``/``eval`` serves as validation when there is no validation file) keep it. Otherwise, as in nanochat, the
last file in sorted order is the validation split and the others are train. A source of one file holds out the
documents whose CRC-32 is divisible by 100 (about 1%): a hash of the text, not "every Nth row", because a row's
position depends on how shards are split across ranks and workers, and its text does not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq
from datasets import IterableDataset, load_dataset

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = "karpathy/climbmix-400b-shuffle"
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
