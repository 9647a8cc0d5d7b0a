"""Tokenizer training time: nanochat_hf.train_tokenizer (tokenizers' BpeTrainer) vs rustbpe (nanochat's trainer).

Both train on the same documents to the same vocabulary size; each run happens in a fresh subprocess (so neither
inherits the other's thread pools or allocator state), alternating between the two, and the medians are compared.
The run also checks that both learned the same tokens with the same ids.

Text: the .py, .md and .txt files of this virtualenv's site-packages in sorted path order, one document per file,
each cut to --doc-cap characters, read until the cut documents total at least --mb megabytes of UTF-8.
Deterministic for a given environment.

    python benchmarks/tokenizer_train.py                   # 50 MB, vocab 32768, 3 runs each
    python benchmarks/tokenizer_train.py --mb 10 --repeats 1 --json benchmarks/results/tokenizer_train.json
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


def build_corpus(min_bytes: int, doc_cap: int) -> list[str]:
    root = Path(sysconfig.get_paths()["purelib"])
    paths = sorted(p for p in root.rglob("*") if p.suffix in (".py", ".md", ".txt") and p.is_file())
    docs, total = [], 0
    for path in paths:
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        text = text[:doc_cap]
        if not text:
            continue
        docs.append(text)
        total += len(text.encode("utf-8"))
        if total >= min_bytes:
            return docs
    raise SystemExit(f"only {total / 1e6:.1f} MB of text under {root}; lower --mb")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return usage.ru_utime + usage.ru_stime


def worker(which: str, corpus_file: str, vocab_size: int, out_file: str) -> None:
    """One timed training run; writes wall and CPU seconds and the learned tokens (hex, id order) to out_file."""
    import rustbpe

    from nanochat_hf.tokenizer.bpe import SPECIAL_TOKENS, SPLIT_PATTERN, _token_bytes_of, train_tokenizer

    with open(corpus_file, "rb") as f:
        texts = pickle.load(f)
    cpu_start, start = _cpu_seconds(), time.perf_counter()
    if which == "rustbpe":
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        ranks = tok.get_mergeable_ranks()
        seconds = time.perf_counter() - start
        tokens = [bytes(token).hex() for token, _ in sorted(ranks, key=lambda item: item[1])]
    else:
        tokenizer = train_tokenizer(texts, vocab_size, doc_cap=None, show_progress=False)
        seconds = time.perf_counter() - start
        vocab = {i: t for t, i in tokenizer.get_vocab().items() if t not in SPECIAL_TOKENS}
        tokens = [_token_bytes_of(vocab[i]).hex() for i in range(len(vocab))]
    cpu = _cpu_seconds() - cpu_start
    with open(out_file, "w") as f:
        json.dump({"seconds": seconds, "cpu_seconds": cpu, "tokens": tokens}, f)


def run_worker(which: str, corpus_file: str, vocab_size: int, tmp: str) -> dict:
    out_file = os.path.join(tmp, f"{which}.json")
    cmd = [sys.executable, __file__, "--worker", which, "--corpus-file", corpus_file, "--vocab-size", str(vocab_size)]
    subprocess.run([*cmd, "--out-file", out_file], check=True)
    with open(out_file) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=50.0, help="megabytes of text to train on (default 50)")
    parser.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size incl. 9 specials (32768)")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="characters kept per document (10000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per trainer (default 3)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--worker", choices=["ours", "rustbpe"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus-file", help=argparse.SUPPRESS)
    parser.add_argument("--out-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.corpus_file, args.vocab_size, args.out_file)
        return

    texts = build_corpus(int(args.mb * 1e6), args.doc_cap)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(f"text: {len(texts):,} documents, {n_bytes / 1e6:.1f} MB, {sum(map(len, texts)):,} chars; "
          f"vocab {args.vocab_size:,}; {os.cpu_count()} CPUs")  # fmt: skip
    times: dict[str, list[float]] = {"rustbpe": [], "ours": []}
    cpu_times: dict[str, list[float]] = {"rustbpe": [], "ours": []}
    tokens: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus_file = os.path.join(tmp, "corpus.pkl")
        with open(corpus_file, "wb") as f:
            pickle.dump(texts, f)
        for i in range(args.repeats):
            for which in ("rustbpe", "ours"):
                result = run_worker(which, corpus_file, args.vocab_size, tmp)
                times[which].append(result["seconds"])
                cpu_times[which].append(result["cpu_seconds"])
                tokens[which] = result["tokens"]
                print(
                    f"  run {i + 1}: {which:8s} {result['seconds']:7.2f} s  ({result['cpu_seconds']:.2f} CPU s)",
                    flush=True,
                )

    same = tokens["ours"] == tokens["rustbpe"]
    first_diff = None
    if not same:
        first_diff = next(
            (i for i, (a, b) in enumerate(zip(tokens["ours"], tokens["rustbpe"], strict=False)) if a != b),
            min(len(tokens["ours"]), len(tokens["rustbpe"])),
        )
    ours, rust = statistics.median(times["ours"]), statistics.median(times["rustbpe"])
    cpu_ours, cpu_rust = statistics.median(cpu_times["ours"]), statistics.median(cpu_times["rustbpe"])
    print(f"rustbpe: median {rust:.2f} s (min {min(times['rustbpe']):.2f}), {cpu_rust:.2f} CPU s")
    print(f"ours:    median {ours:.2f} s (min {min(times['ours']):.2f}), {cpu_ours:.2f} CPU s")
    print(f"ratio ours/rustbpe: {ours / rust:.2f}x (median), {min(times['ours']) / min(times['rustbpe']):.2f}x (min)")
    print(f"same tokens and ids as rustbpe: {same}" + ("" if same else f" (first difference at id {first_diff})"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        result = {
            "documents": len(texts),
            "megabytes": n_bytes / 1e6,
            "vocab_size": args.vocab_size,
            "doc_cap": args.doc_cap,
            "cpus": os.cpu_count(),
            "machine": platform.platform(),
            "seconds": times,
            "cpu_seconds": cpu_times,
            "median_seconds": {"ours": ours, "rustbpe": rust},
            "median_cpu_seconds": {"ours": cpu_ours, "rustbpe": cpu_rust},
            "ratio_median": ours / rust,
            "ratio_min": min(times["ours"]) / min(times["rustbpe"]),
            "same_tokens": same,
            "first_difference": first_diff,
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
