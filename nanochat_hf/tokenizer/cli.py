"""`nanochat-hf tokenizer train` and `nanochat-hf tokenizer eval` (nanochat's tok_train.py and tok_eval.py)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..output_folder import check_output_folder, staged_folder

_TRAIN_DESCRIPTION = """\
Train nanochat's byte-level BPE tokenizer (GPT-4-style split regex, 9 chat
special tokens as the last ids) with the Hugging Face `tokenizers` trainer. It
learns the same merges, in the same order, as nanochat's rustbpe on the same
text, and is saved as a transformers tokenizer folder (tokenizer.json,
tokenizer_config.json, chat_template.jinja) that AutoTokenizer.from_pretrained
loads without remote code, plus tokenizer_training.json describing the run.

Text comes from --data (files or folders: .txt = one document per file,
.jsonl/.parquet = one document per row in --text-column) or, by default, from
the corpus embedded in Python itself (CPython's documentation; no download).
Documents are cut to --doc-cap characters and reading stops after --max-chars
characters, as in nanochat."""

_EVAL_DESCRIPTION = """\
Report how well a tokenizer compresses a few kinds of text (bytes per token,
higher is better): built-in news, Korean, code, math and science samples, plus
the first --data-chars characters of each --data source. With --compare, the
same table is computed for other tokenizers (folders or Hub ids such as gpt2)
side by side, like nanochat's tok_eval."""


def _count(docs: Iterable[str], totals: dict[str, int]) -> Iterator[str]:
    for doc in docs:
        totals["documents"] += 1
        totals["characters"] += len(doc)
        yield doc


def _print_stats(names: list[str], stats: list[dict[str, dict]]) -> None:
    """One row per text kind: its size, then tokens and bytes per token for each tokenizer."""
    header = f"{'text':<12}{'bytes':>10}" + "".join(f"{name[-22:]:>26}" for name in names)
    print(header)
    print("-" * len(header))
    for kind in stats[0]:
        row = f"{kind[:12]:<12}{stats[0][kind]['bytes']:>10,}"
        row += "".join(f"{s[kind]['tokens']:>14,}{s[kind]['bytes_per_token']:>8.2f} b/t" for s in stats)
        print(row)


def _texts(paths: list[str], text_column: str) -> Iterator[str]:
    """Local files and folders, or a Hub dataset id (streamed train split) where no such path exists."""
    from ..data.sources import open_text_stream
    from .bpe import iter_texts

    for path in paths:
        if Path(path).exists():
            yield from iter_texts([path], text_column)
        else:
            yield from (row["text"] for row in open_text_stream(path, split="train", text_column=text_column))


def train_main(args: argparse.Namespace) -> None:
    """Train a tokenizer as described by the `tokenizer train` arguments and save it to args.out."""
    from ..data.embedded import embedded_corpus, embedded_corpus_info
    from .bpe import _capped_docs, compression_stats, train_tokenizer

    out = check_output_folder(args.out, overwrite=args.overwrite, inputs=args.data or ())
    doc_cap = args.doc_cap or None
    max_chars = args.max_chars or None
    source = _texts(args.data, args.text_column) if args.data else embedded_corpus()
    totals = {"documents": 0, "characters": 0}
    start = time.perf_counter()
    docs = _count(_capped_docs(source, doc_cap, max_chars), totals)
    tokenizer = train_tokenizer(
        docs, args.vocab_size, doc_cap=None, max_chars=None, show_progress=not args.no_progress,
        source="--data " + " ".join(args.data) if args.data else "the embedded corpus",
    )
    seconds = time.perf_counter() - start
    info = {
        "vocab_size": len(tokenizer),
        "requested_vocab_size": args.vocab_size,
        "doc_cap": doc_cap,
        "max_chars": max_chars,
        **totals,
        "seconds": round(seconds, 3),
        "source": [str(p) for p in args.data] if args.data else "embedded",
    }
    if not args.data:
        info["embedded_corpus"] = embedded_corpus_info()

    with staged_folder(out) as staged:  # an interrupted run never leaves a half folder
        tokenizer.save_pretrained(staged)
        (staged / "tokenizer_training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(
        f"trained a {len(tokenizer):,}-token tokenizer on {totals['documents']:,} documents "
        f"({totals['characters']:,} characters) in {seconds:.1f} s -> {out}"
    )
    _print_stats([str(out)], [compression_stats(tokenizer)])


def _data_samples(paths: list[str], text_column: str, max_chars: int) -> dict[str, str]:
    from .bpe import iter_texts

    samples = {}
    for path in paths:
        pieces, total = [], 0
        for doc in iter_texts([path], text_column):
            pieces.append(doc[: max_chars - total])
            total += len(pieces[-1])
            if total >= max_chars:
                break
        samples[Path(path).name or str(path)] = "\n\n".join(pieces)
    return samples


def eval_main(args: argparse.Namespace) -> None:
    """Print (and optionally save as JSON) bytes-per-token statistics for the `tokenizer eval` arguments."""
    from .bpe import EVAL_SAMPLES, compression_stats, load_tokenizer

    names = [args.tokenizer, *args.compare]
    tokenizers = [load_tokenizer(name) for name in names]
    samples = {**EVAL_SAMPLES, **_data_samples(args.data, args.text_column, args.data_chars)}
    stats = [compression_stats(tok, samples) for tok in tokenizers]
    print("vocab sizes: " + ", ".join(f"{name} {len(tok):,}" for name, tok in zip(names, tokenizers, strict=True)))
    _print_stats(names, stats)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        result = {
            name: {"vocab_size": len(tok), "stats": s} for name, tok, s in zip(names, tokenizers, stats, strict=True)
        }
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


def add_tokenizer_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `tokenizer train` and `tokenizer eval` on the main CLI's subparsers; each sets args.func."""
    parser = subparsers.add_parser(
        "tokenizer",
        help="train or evaluate nanochat's BPE tokenizer",
        description="Train nanochat's tokenizer with Hugging Face tokenizers, or measure a tokenizer's compression.",
    )
    actions = parser.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    formatter = argparse.RawDescriptionHelpFormatter

    train = actions.add_parser(
        "train",
        help="train a tokenizer (nanochat's tok_train)",
        description=_TRAIN_DESCRIPTION,
        formatter_class=formatter,
    )
    train.add_argument("--out", required=True, help="output folder for the tokenizer (new or empty)")
    train.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="text files or folders (.txt, .jsonl, .parquet) or a Hub dataset id (its train split, streamed); "
        "default: embedded corpus",
    )
    train.add_argument(
        "--text-column", default="text", help="column holding the text in .jsonl/.parquet (default: text)"
    )
    train.add_argument(
        "--vocab-size", type=int, default=32768, help="vocabulary size including the 9 special tokens (default: 32768)"
    )
    train.add_argument(
        "--doc-cap", type=int, default=10_000, help="characters kept per document, 0 = all (default: 10000)"
    )
    train.add_argument(
        "--max-chars",
        type=int,
        default=2_000_000_000,
        help="stop reading after this many characters, 0 = no limit (default: 2000000000, nanochat's)",
    )
    train.add_argument("--overwrite", action="store_true",
                       help="replace --out if it holds a folder nanochat-hf wrote (never the current or home folder)")
    train.add_argument("--no-progress", action="store_true", help="hide the trainer's progress bars")
    train.set_defaults(func=train_main)

    evaluate = actions.add_parser(
        "eval",
        help="bytes per token on sample texts (nanochat's tok_eval)",
        description=_EVAL_DESCRIPTION,
        formatter_class=formatter,
    )
    evaluate.add_argument("tokenizer", help="tokenizer folder or Hub repo id to evaluate")
    evaluate.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="TOKENIZER",
        help="another tokenizer to compare with (repeatable)",
    )
    evaluate.add_argument(
        "--data", action="append", default=[], metavar="PATH", help="also measure on this file or folder (repeatable)"
    )
    evaluate.add_argument(
        "--data-chars", type=int, default=1_000_000, help="characters read per --data (default: 1000000)"
    )
    evaluate.add_argument(
        "--text-column", default="text", help="column holding the text in .jsonl/.parquet (default: text)"
    )
    evaluate.add_argument("--json", metavar="PATH", help="also write the statistics to PATH as JSON")
    evaluate.set_defaults(func=eval_main)
    return parser
