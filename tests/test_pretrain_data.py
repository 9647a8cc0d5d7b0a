"""The pretraining data pipeline (nanochat_hf/data/pretrain.py) on small local fixtures written by each test."""

import json
import math
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat_hf.data.embedded import embedded_corpus
from nanochat_hf.data.pretrain import BestFitPacker, PackedBatches, PretrainStream
from nanochat_hf.data.sources import PretrainDataError, open_text_stream, resolve_source
from nanochat_hf.evaluation.bpb import evaluate_bpb
from nanochat_hf.tokenizer.bpe import train_tokenizer

from .hub_cache import populate_hub_cache


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(embedded_corpus(max_chars=200_000), vocab_size=512, show_progress=False)


@pytest.fixture(scope="module")
def texts():
    """100 short documents of varied length (the packer sees everything from whole fits to crops)."""
    return [doc[: 80 + 37 * (i % 9)] for i, doc in enumerate(embedded_corpus()) if i < 100]


def write_parquet(path: Path, texts: list, row_group_size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"text": pa.array(texts, type=pa.string()), "id": list(range(len(texts)))})
    pq.write_table(table, path, row_group_size=row_group_size)


def write_shards(folder: Path, texts: list[str], n_files: int) -> list[list[str]]:
    """nanochat-style shard_00000.parquet ... ; document i goes to file i % n_files. Returns each file's texts."""
    parts = [texts[i::n_files] for i in range(n_files)]
    for i, part in enumerate(parts):
        write_parquet(folder / f"shard_{i:05d}.parquet", part)
    return parts


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def encode_docs(tokenizer, texts: list[str]) -> list[tuple[int, ...]]:
    ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [(tokenizer.bos_token_id, *doc) for doc in ids]


def take(stream, n: int) -> list[dict]:
    batches = []
    iterator = iter(stream)
    for batch in iterator:
        batches.append(batch)
        if len(batches) == n:
            break
    iterator.close()  # stops the DataLoader workers now
    return batches


def all_documents(stream: PackedBatches) -> list[tuple[int, ...]]:
    """Every tokenized document of one epoch of the stream's feed (the packer's input)."""
    return [tuple(doc) for chunk in stream.feed.chunks() for doc in chunk]


# ---------------------------------------------------------------------------------------------------------------
# Best-fit packing


def reference_rows(chunks: Iterable[list[list[int]]], buffer_size: int, capacity: int) -> Iterator[list[int]]:
    """nanochat's bos_bestfit, restated: before each pick, top the buffer up one chunk at a time until it holds
    buffer_size documents; then take the longest document that fits (earliest among equals), or if none fits the
    shortest (earliest among equals), cut to the room left. Ends when the chunks run out before a row is full."""
    pending, buffer = iter(chunks), []
    while True:
        row = []
        while len(row) < capacity:
            while len(buffer) < buffer_size and (chunk := next(pending, None)) is not None:
                buffer += chunk
            if not buffer:
                return
            room = capacity - len(row)
            fits = [(len(doc), -i) for i, doc in enumerate(buffer) if len(doc) <= room]
            pick = -max(fits)[1] if fits else min(range(len(buffer)), key=lambda i: (len(buffer[i]), i))
            row += buffer.pop(pick)[:room]
        yield row


def pack_all(chunks: list[list[list[int]]], buffer_size: int, capacity: int) -> list[list[int]]:
    packer, pending, rows = BestFitPacker(buffer_size), iter(chunks), []
    while (row := packer.next_row(capacity, lambda: next(pending, None))) is not None:
        rows.append(row)
    return rows


def test_best_fit_hand_example():
    # BOS = 9; document lengths A=5, B=3, C=4, D=9 (longer than the row), E=2, all buffered; rows of 8.
    a, b, c, d, e = [9, 1, 1, 1, 1], [9, 2, 2], [9, 3, 3, 3], [9, 4, 4, 4, 4, 4, 4, 4, 4], [9, 5]
    # Row 1: A is the largest that fits 8, then B fills the 3 left. Row 2: C (largest of C, E), then E; D does
    # not fit the 2 left and is the only (so the shortest) document: cropped to 2. The rest of D is dropped.
    assert pack_all([[a, b, c, d, e]], buffer_size=5, capacity=8) == [a + b, c + e + d[:2]]


def test_best_fit_matches_restatement():
    gen = torch.Generator().manual_seed(0)
    bos = 99
    docs = [[bos] + torch.randint(0, 50, (int(n),), generator=gen).tolist() for n in torch.randint(0, 40, (300,))]
    chunks = [docs[i : i + 7] for i in range(0, len(docs), 7)]
    for buffer_size, capacity in [(1, 17), (10, 33), (25, 64), (1000, 65)]:
        rows = pack_all(chunks, buffer_size, capacity)
        assert rows == list(reference_rows(chunks, buffer_size, capacity))
        assert rows and all(len(row) == capacity and row[0] == bos for row in rows)


# ---------------------------------------------------------------------------------------------------------------
# Batches


def test_batches_are_bos_aligned_full_rows_of_whole_documents(tmp_path, tokenizer, texts):
    parts = write_shards(tmp_path / "corpus", texts, 4)
    train_docs = set(encode_docs(tokenizer, [t for part in parts[:-1] for t in part]))  # the last file is val
    bos = tokenizer.bos_token_id
    batch_size, seq_len = 3, 48
    stream = PretrainStream(tmp_path / "corpus", tokenizer, batch_size, seq_len, buffer_size=20)
    for batch in take(stream, 30):
        assert set(batch) == {"input_ids", "labels"}
        assert batch["input_ids"].shape == batch["labels"].shape == (batch_size, seq_len)
        assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
        assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])  # labels are already shifted
        rows = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1).tolist()
        for row in rows:
            assert row[0] == bos
            # No padding: the row is whole train documents, the last one possibly cropped.
            starts = [i for i, token in enumerate(row) if token == bos] + [len(row)]
            pieces = [tuple(row[s:e]) for s, e in zip(starts, starts[1:], strict=False)]
            assert all(piece in train_docs for piece in pieces[:-1])
            assert any(doc[: len(pieces[-1])] == pieces[-1] for doc in train_docs)


def test_training_stream_loops_over_epochs(tmp_path, tokenizer, texts):
    write_shards(tmp_path / "corpus", texts[:12], 3)
    stream = PretrainStream(tmp_path / "corpus", tokenizer, 2, 32, buffer_size=4, tokenizer_batch_size=3)
    first = take(stream, 1)[0]
    take(stream, 60)
    assert stream.feed.epoch >= 2 and stream.batches == 61
    again = PretrainStream(tmp_path / "corpus", tokenizer, 2, 32, buffer_size=4, tokenizer_batch_size=3)
    assert torch.equal(take(again, 1)[0]["input_ids"], first["input_ids"])


def test_validation_stream_is_finite_and_starts_over(tmp_path, tokenizer, texts):
    write_shards(tmp_path / "corpus", texts, 4)

    def validation(**kwargs):
        return PretrainStream(tmp_path / "corpus", tokenizer, 2, 32, split="validation", buffer_size=8, **kwargs)

    capped = list(validation(max_batches=3))
    assert len(capped) == 3
    assert all(torch.equal(x["labels"], y["labels"]) for x, y in zip(capped, validation(max_batches=3), strict=True))
    whole = list(validation())  # one pass over the validation file, then it ends
    assert 3 < len(whole) < 200
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(capped, whole[:3], strict=True))


# ---------------------------------------------------------------------------------------------------------------
# Sources and splits


def read_texts(source, split: str) -> list[str]:
    return [row["text"] for row in open_text_stream(str(source), split=split)]


def test_last_file_is_validation(tmp_path, texts):
    for i in range(3):
        write_jsonl(tmp_path / "data" / f"part-{i}.jsonl", [{"text": t, "n": 1} for t in texts[i::3]])
    assert read_texts(tmp_path / "data", "train") == texts[0::3] + texts[1::3]
    assert read_texts(tmp_path / "data", "validation") == texts[2::3]
    assert read_texts(tmp_path / "data", "val") == texts[2::3]


def test_named_splits_are_respected(tmp_path, texts):
    write_parquet(tmp_path / "data" / "train-00000.parquet", texts[:40])
    write_parquet(tmp_path / "data" / "train-00001.parquet", texts[40:80])
    write_parquet(tmp_path / "data" / "validation-00000.parquet", texts[80:])
    assert read_texts(tmp_path / "data", "train") == texts[:80]
    assert read_texts(tmp_path / "data", "validation") == texts[80:]


def test_single_file_holds_out_about_one_percent_by_hash(tmp_path):
    docs = [f"document {i}: " + "lorem ipsum " * (i % 5) for i in range(2000)]
    write_jsonl(tmp_path / "all.jsonl", [{"text": t} for t in docs])
    train, validation = read_texts(tmp_path / "all.jsonl", "train"), read_texts(tmp_path / "all.jsonl", "validation")
    assert sorted(train + validation) == sorted(docs) and not set(train) & set(validation)
    assert 5 <= len(validation) <= 50


def test_txt_files_are_one_document_each(tmp_path, texts):
    for i, text in enumerate(texts[:5]):
        (tmp_path / "txt" / f"doc{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "txt" / f"doc{i}.txt").write_text(text, encoding="utf-8")
    assert read_texts(tmp_path / "txt", "train") == texts[:4]
    assert read_texts(tmp_path / "txt", "validation") == texts[4:5]


def test_non_streaming_reads_the_same_documents(tmp_path, texts, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    write_shards(tmp_path / "corpus", texts, 3)
    streamed = read_texts(tmp_path / "corpus", "train")
    prepared = [row["text"] for row in open_text_stream(str(tmp_path / "corpus"), streaming=False)]
    assert prepared == streamed


def test_hub_dataset_id_from_offline_cache(tmp_path, texts, monkeypatch):
    from huggingface_hub import constants

    parts = write_shards(tmp_path / "repo", texts, 3)
    populate_hub_cache(tmp_path / "repo", "someone/tiny-climbmix", tmp_path / "hub", repo_type="dataset")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert read_texts("someone/tiny-climbmix", "validation") == parts[2]  # nanochat: the last shard
    assert read_texts("someone/tiny-climbmix", "train") == parts[0] + parts[1]
    with pytest.raises(PretrainDataError, match="someone/not-cached: offline"):
        resolve_source("someone/not-cached")


# ---------------------------------------------------------------------------------------------------------------
# Ranks and workers


@pytest.mark.parametrize("n_files, num_workers", [(5, 0), (4, 2)])  # 4 and 3 train files: per-file and per-row
def test_ranks_read_disjoint_documents_covering_the_split(tmp_path, tokenizer, texts, n_files, num_workers):
    parts = write_shards(tmp_path / "corpus", texts, n_files)
    expected = Counter(encode_docs(tokenizer, [t for part in parts[:-1] for t in part]))

    def rank_docs(rank):
        stream = PretrainStream(
            tmp_path / "corpus", tokenizer, 2, 32, rank=rank, world_size=2, num_workers=num_workers, loop=False
        )
        return Counter(all_documents(stream))

    rank0, rank1 = rank_docs(0), rank_docs(1)
    assert rank0 and rank1
    assert rank0 + rank1 == expected  # each document exactly once, on one rank


def test_fewer_shards_than_workers(tmp_path, tokenizer, texts):
    write_parquet(tmp_path / "one.parquet", texts, row_group_size=10)  # one file, 10 row groups
    write_jsonl(tmp_path / "one.jsonl", [{"text": t} for t in texts])  # one file, cannot be split further
    expected = Counter(encode_docs(tokenizer, read_texts(tmp_path / "one.jsonl", "train")))
    for source, workers in [("one.parquet", 2), ("one.jsonl", 1)]:
        stream = PretrainStream(tmp_path / source, tokenizer, 2, 32, num_workers=2, loop=False)
        assert stream.feed.num_workers == workers
        assert Counter(all_documents(stream)) == expected


# ---------------------------------------------------------------------------------------------------------------
# Exact resume


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_bit_exact(tmp_path, tokenizer, texts, num_workers):
    # Row groups of 5 and 1 documents in turn (the last file is validation). Parquet row groups are dealt to the
    # workers in turn, so with 2 workers one reads the 5s (each as chunks of 3 and 2) and the other the 1s, and
    # finishes its share well before the first.
    start = 0
    for i, sizes in enumerate([[5, 1, 5], [1, 5, 1], [5, 1, 6, 1], [5]]):
        write_row_groups(tmp_path / "corpus" / f"shard_{i:05d}.parquet", texts[start : start + sum(sizes)], sizes)
        start += sum(sizes)

    def stream():
        return PretrainStream(
            tmp_path / "corpus", tokenizer, 2, 24, num_workers=num_workers, buffer_size=6, tokenizer_batch_size=3
        )

    total = 60
    straight = stream()
    expected = take(straight, total)
    assert straight.feed.epoch >= 2
    saved_positions = set()
    for k, via in [(3, "json"), (12, "torch"), (34, "json")]:  # inside a row group, a worker done, a later epoch
        first = stream()
        assert all(
            torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(take(first, k), expected[:k], strict=True)
        )
        if via == "json":
            state = json.loads(json.dumps(first.state_dict()))
        else:
            torch.save(first.state_dict(), tmp_path / "state.pt")
            state = torch.load(tmp_path / "state.pt", weights_only=True)
        saved_positions.add((state["feed"]["next_worker"], any(state["feed"]["worker_done"])))
        resumed = stream()  # new DataLoader, new workers
        resumed.load_state_dict(state)
        rest = take(resumed, total - k)
        assert len(rest) == total - k
        for x, y in zip(rest, expected[k:], strict=True):
            assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    if num_workers == 2:  # the saved states did exercise the round-robin position and a finished worker
        assert {position for position, _ in saved_positions} == {0, 1} and any(d for _, d in saved_positions)


def test_resume_needs_the_same_layout(tmp_path, tokenizer, texts):
    write_shards(tmp_path / "corpus", texts, 5)
    stream = PretrainStream(tmp_path / "corpus", tokenizer, 2, 24, num_workers=0)
    take(stream, 2)
    other = PretrainStream(tmp_path / "corpus", tokenizer, 2, 24, num_workers=2)
    with pytest.raises(ValueError, match="num_workers"):
        other.load_state_dict(stream.state_dict())


# ---------------------------------------------------------------------------------------------------------------
# Batch for batch with nanochat's loader (nanochat/dataloader.py)

# Row groups per file, none a multiple of 128; the last file is validation. nanochat cuts every row group into
# chunks of 128 documents from its start: 300 -> 128, 128, 44; 77 -> 77; 129 -> 128, 1; and so on.
NANOCHAT_ROW_GROUPS = [[300, 77, 129, 150], [129, 64, 200], [77, 131]]


def write_row_groups(path: Path, texts: list[str], sizes: list[int]) -> None:
    """One parquet file whose row groups hold exactly `sizes` documents, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, pa.schema([("text", pa.string())])) as writer:
        start = 0
        for size in sizes:
            group = pa.table({"text": pa.array(texts[start : start + size], type=pa.string())})
            writer.write_table(group, row_group_size=size)
            start += size
    metadata = pq.ParquetFile(path).metadata
    assert [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)] == sizes


@pytest.fixture(scope="module")
def nanochat_shards(tmp_path_factory) -> Path:
    """nanochat's layout, base_data_climbmix/shard_NNNNN.parquet, with the row groups of NANOCHAT_ROW_GROUPS
    holding documents of 10 to 300 characters (a row of 65 tokens takes from one to several)."""
    corpus = list(embedded_corpus())
    folder = tmp_path_factory.mktemp("nanochat_base") / "base_data_climbmix"
    i = 0
    for n, sizes in enumerate(NANOCHAT_ROW_GROUPS):
        texts = []
        for _ in range(sum(sizes)):
            start = (i * 37) % 200
            texts.append(corpus[i % len(corpus)][start : start + 10 + (i * 53) % 290])
            i += 1
        write_row_groups(folder / f"shard_{n:05d}.parquet", texts, sizes)
    return folder


def nanochat_rows(folder: Path, tokenizer, capacity: int, buffer_size: int, rank: int = 0, world_size: int = 1):
    """The rows nanochat's loader packs, its rule restated: the train files (all but the last, sorted), over and
    over; in each, this rank's row groups (rank, rank + world_size, ...), each read whole and cut into chunks of 128
    documents from its start, so a chunk never spans two row groups and the last chunk of each is shorter; every
    chunk tokenized with BOS prepended; the best-fit buffer topped up one chunk at a time (reference_rows)."""
    files = sorted(folder.glob("*.parquet"))[:-1]

    def chunks() -> Iterator[list[list[int]]]:
        while True:
            for path in files:
                parquet = pq.ParquetFile(path)
                for group in range(rank, parquet.num_row_groups, world_size):
                    texts = parquet.read_row_group(group).column("text").to_pylist()
                    for start in range(0, len(texts), 128):
                        yield [list(doc) for doc in encode_docs(tokenizer, texts[start : start + 128])]

    return reference_rows(chunks(), buffer_size, capacity)


def batch_rows(batches: list[dict]) -> list[list[list[int]]]:
    """Each batch as its rows of T+1 tokens."""
    return [torch.cat([b["input_ids"], b["labels"][:, -1:]], dim=1).tolist() for b in batches]


def first_difference(ours: list, theirs: list) -> int | None:
    """The first batch index where the two differ (a length mismatch counts), None if they are equal."""
    if ours == theirs:
        return None
    return next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))


def expected_batches(rows: Iterator[list[int]], batch_size: int, steps: int) -> list[list[list[int]]]:
    return [list(islice(rows, batch_size)) for _ in range(steps)]


@pytest.mark.parametrize("buffer_size, rank, world_size", [(1000, 0, 1), (60, 0, 1), (60, 1, 2)])
def test_batches_follow_nanochats_loader(nanochat_shards, tokenizer, buffer_size, rank, world_size):
    # 1000 is nanochat's buffer; with 60 a chunk is taken every few batches, so every chunk boundary shows. Enough
    # steps to read every train row group, cross the shard boundary and start the second pass.
    batch_size, seq_len, steps = 4, 64, 180
    stream = PretrainStream(
        nanochat_shards, tokenizer, batch_size, seq_len, buffer_size=buffer_size, rank=rank, world_size=world_size
    )
    ours = batch_rows(take(stream, steps))
    assert stream.feed.epoch >= 1
    rows = nanochat_rows(nanochat_shards, tokenizer, seq_len + 1, buffer_size, rank, world_size)
    differs = first_difference(ours, expected_batches(rows, batch_size, steps))
    assert differs is None, f"batch {differs} of {steps} differs from nanochat's"


def test_resume_inside_a_row_group_keeps_nanochats_batches(nanochat_shards, tokenizer):
    # Saved every 4 batches: with a buffer of 60 a chunk of 128 lasts several batches, so most saves fall between
    # two chunks of one row group, some at the end of one, and one in the second pass.
    batch_size, seq_len, total = 4, 64, 100
    expected = expected_batches(nanochat_rows(nanochat_shards, tokenizer, seq_len + 1, 60), batch_size, total)

    def stream():
        return PretrainStream(nanochat_shards, tokenizer, batch_size, seq_len, buffer_size=60)

    first = stream()
    iterator = iter(first)
    for k in range(1, total):
        next(iterator)
        if k % 4:
            continue
        resumed = stream()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        differs = first_difference(batch_rows(take(resumed, min(8, total - k))), expected[k : k + 8])
        assert differs is None, f"resumed after batch {k}: batch {k + differs} differs from nanochat's"
    iterator.close()


# nanochat's own loader at HEAD on the same shards and tokenizer (converted to its tokenizer.pkl), run by its python.
NANOCHAT_LOADER = """
import json, sys, torch
from nanochat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit
from nanochat.tokenizer import get_tokenizer
batch_size, seq_len, steps, buffer_size = json.loads(sys.argv[1])
loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(
    get_tokenizer(), batch_size, seq_len, "train", device="cpu", buffer_size=buffer_size)
batches = []
for _ in range(steps):
    inputs, targets, _ = next(loader)
    batches.append(torch.cat([inputs, targets[:, -1:]], dim=1).tolist())
print(json.dumps(batches))
"""


def test_batches_equal_nanochats_own_loader(nanochat_shards, tokenizer, tmp_path):
    checkout = os.environ.get("NANOCHAT_CHECKOUT")
    if not checkout or not (Path(checkout) / "nanochat" / "dataloader.py").is_file():
        pytest.skip(
            "nanochat's own loader needs a checkout: set NANOCHAT_CHECKOUT to nanochat's root and NANOCHAT_PYTHON to "
            "a python that runs it (torch, pyarrow, rustbpe, tiktoken); the restated rule is tested without it"
        )
    pytest.importorskip("tiktoken")
    from nanochat_hf.hub.tiktoken_format import hf_to_tiktoken, write_tiktoken_pickle

    base = nanochat_shards.parent  # NANOCHAT_BASE_DIR: base_data_climbmix/ and tokenizer/
    (base / "tokenizer").mkdir(exist_ok=True)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    write_tiktoken_pickle(hf_to_tiktoken(tokenizer, tmp_path / "tokenizer"), base / "tokenizer" / "tokenizer.pkl")
    batch_size, seq_len, steps = 4, 64, 180
    for buffer_size, rank, world_size in [(1000, 0, 1), (60, 0, 1), (60, 1, 2)]:
        env = {**os.environ, "NANOCHAT_BASE_DIR": str(base)}
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):  # nanochat reads its rank from torchrun's variables
            env.pop(name, None)
        if world_size > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
        proc = subprocess.run(
            [os.environ.get("NANOCHAT_PYTHON", sys.executable), "-c", NANOCHAT_LOADER,
             json.dumps([batch_size, seq_len, steps, buffer_size])],
            cwd=checkout, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        theirs = json.loads(proc.stdout.strip().splitlines()[-1])
        stream = PretrainStream(
            nanochat_shards, tokenizer, batch_size, seq_len, buffer_size=buffer_size, rank=rank, world_size=world_size
        )
        differs = first_difference(batch_rows(take(stream, steps)), theirs)
        where = f"buffer {buffer_size}, rank {rank} of {world_size}"
        assert differs is None, f"{where}: batch {differs} of {steps} differs from nanochat's own loader"


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a PretrainDataError raised by the main process, naming the source and the place


def first_batch_error(source, tokenizer, num_workers=2) -> str:
    with pytest.raises(PretrainDataError) as info:
        take(PretrainStream(source, tokenizer, 2, 16, num_workers=num_workers), 1)
    assert type(info.value) is PretrainDataError and "Traceback" not in str(info.value)
    return str(info.value)


def test_source_without_files(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("not a corpus")
    with pytest.raises(PretrainDataError, match=r"empty: no \.parquet, \.jsonl, \.txt files found"):
        resolve_source(tmp_path / "empty")
    with pytest.raises(PretrainDataError, match="no such file or folder"):
        resolve_source(tmp_path / "missing")


def test_source_without_documents(tmp_path, tokenizer):
    write_parquet(tmp_path / "empty" / "a.parquet", [])
    write_parquet(tmp_path / "empty" / "b.parquet", [])
    with pytest.raises(PretrainDataError, match=r"empty \[train\]: no documents"):
        resolve_source(tmp_path / "empty")
    write_jsonl(tmp_path / "blank" / "a.jsonl", [])
    write_jsonl(tmp_path / "blank" / "b.jsonl", [])
    assert "blank [train]: no documents" in first_batch_error(tmp_path / "blank", tokenizer)


def test_missing_text_column_lists_the_columns(tmp_path, texts):
    table = pa.table({"content": texts[:4], "url": ["u"] * 4})
    (tmp_path / "c").mkdir()
    pq.write_table(table, tmp_path / "c" / "a.parquet")
    with pytest.raises(
        PretrainDataError, match=r"no column 'text' in .*a\.parquet; the available columns are \['content', 'url'\]"
    ):
        open_text_stream(str(tmp_path / "c"))
    assert next(iter(open_text_stream(str(tmp_path / "c"), text_column="content")))["content"] == texts[0]


def test_missing_text_column_in_one_jsonl_row(tmp_path, tokenizer):
    write_jsonl(tmp_path / "j" / "a.jsonl", [{"text": "one"}, {"text": "two"}, {"body": "three"}, {"text": "four"}])
    message = first_batch_error(tmp_path / "j" / "a.jsonl", tokenizer)
    assert "a.jsonl: row 2 (line 3): no column 'text'; this row has ['body']" in message


def test_non_utf8_text_file(tmp_path, tokenizer):
    (tmp_path / "t").mkdir()
    for name, data in [("a.txt", b"fine text"), ("b.txt", b"caf\xe9 au lait"), ("c.txt", b"validation")]:
        (tmp_path / "t" / name).write_bytes(data)
    message = first_batch_error(tmp_path / "t", tokenizer)
    assert "b.txt: not valid UTF-8 at byte offset 3" in message and message.startswith(str(tmp_path / "t"))


def test_null_text_names_the_row(tmp_path, tokenizer, texts):
    write_parquet(tmp_path / "p" / "a.parquet", texts[:20])
    write_parquet(tmp_path / "p" / "b.parquet", texts[20:25] + [None] + texts[26:30])
    write_parquet(tmp_path / "p" / "c.parquet", texts[30:40])
    message = first_batch_error(tmp_path / "p", tokenizer)
    assert "b.parquet: row 5: column 'text' is null" in message


def test_rank_without_a_row_group(tmp_path, tokenizer, texts):
    # Ranks share parquet files by row group, as in nanochat; the train file here has a single one.
    write_parquet(tmp_path / "p" / "a.parquet", texts[:8], row_group_size=8)
    write_parquet(tmp_path / "p" / "b.parquet", texts[8:16], row_group_size=8)
    with pytest.raises(PretrainDataError, match=r"rank 1 of 2 gets no row group .*; use fewer ranks"):
        PretrainStream(tmp_path / "p", tokenizer, 2, 16, rank=1, world_size=2)


def test_non_string_text_names_the_row(tmp_path):
    write_jsonl(tmp_path / "n.jsonl", [{"text": "fine"}, {"text": 42}, {"text": "fine too"}])
    with pytest.raises(PretrainDataError, match=r"n\.jsonl: row 1 \(line 2\): column 'text' holds int, not text$"):
        open_text_stream(str(tmp_path / "n.jsonl"))


def test_txt_sources_have_only_a_text_column(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(PretrainDataError, match="text_column='body' does not apply"):
        open_text_stream(str(tmp_path / "a.txt"), text_column="body")


# ---------------------------------------------------------------------------------------------------------------
# Bits per byte


def test_evaluate_bpb_matches_hand_computation(tiny_model_factory):
    model = tiny_model_factory("2025")
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    token_bytes = torch.randint(0, 4, (vocab,), generator=gen, dtype=torch.int32)  # about a quarter are 0 bytes
    batches = []
    for _ in range(2):
        input_ids = torch.randint(0, vocab, (2, 9), generator=gen)
        labels = torch.randint(0, vocab, (2, 9), generator=gen)
        labels[0, :3] = -100
        labels[1, 4] = -1  # nanochat's ignore index
        batches.append({"input_ids": input_ids, "labels": labels})

    nats, n_bytes = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logprobs = torch.log_softmax(model(input_ids=batch["input_ids"]).logits.double(), dim=-1)
            for b, t in torch.nonzero(batch["labels"] >= 0).tolist():
                target = int(batch["labels"][b, t])
                if token_bytes[target] > 0:
                    nats -= float(logprobs[b, t, target])
                    n_bytes += int(token_bytes[target])
    assert n_bytes > 0
    assert evaluate_bpb(model, batches, token_bytes) == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)

    no_bytes = [{"input_ids": batches[0]["input_ids"], "labels": torch.full((2, 9), -100)}]
    assert evaluate_bpb(model, no_bytes, token_bytes) == math.inf
