"""The offline default corpus: English prose that ships with every CPython installation.

Provenance: two parts of the running interpreter's own standard library, read from disk at call time.

1. ``pydoc_data.topics.topics`` (about 465K characters): the language-reference and library-reference topics
   that ``help("if")``, ``help("FORMATTING")`` etc. print, generated from CPython's ``Doc/`` sources. One
   document per topic, in sorted topic order.
2. The module, class and function docstrings of the standard library's ``.py`` files under
   ``sysconfig.get_paths()["stdlib"]`` (about 1.7M characters on CPython 3.11), excluding ``site-packages``,
   test packages (``test``, ``tests``, ``idle_test``) and ``idlelib``. One document per module: its docstrings
   in source order, each cleaned with ``inspect.cleandoc`` and separated by a blank line; files are read in sorted
   path order.

Licence: this text is CPython's own documentation, distributed under the Python Software Foundation License
Version 2 (https://docs.python.org/3/license.html). It is read from the local installation, never copied into this
repository.

The corpus is deterministic for a given Python build (same version, same stdlib files), which makes runs on it
reproducible without a download. It is tiny by pretraining standards, sized for the CPU tier and for tests.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import os
import re
import sys
import sysconfig
from collections.abc import Iterator

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "__pycache__"})
# A docstring may spell a lone surrogate with an escape (e.g. "\udc80"); such text cannot be UTF-8 encoded, so
# tokenizers would reject it. Replace it with U+FFFD, as decoding with errors="replace" would.
_SURROGATES = re.compile("[\ud800-\udfff]")
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _node_docstrings(node: ast.AST) -> Iterator[str]:
    """Docstrings of `node` and of the classes and functions nested in it, in source order."""
    if isinstance(node, _DOC_NODES):
        doc = ast.get_docstring(node, clean=False)
        if doc and doc.strip():
            yield inspect.cleandoc(doc)
    for child in ast.iter_child_nodes(node):
        yield from _node_docstrings(child)


def _stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    # Sort on the relative path so the order does not depend on where Python is installed.
    return sorted(files, key=lambda path: os.path.relpath(path, root).split(os.sep))


def _module_document(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            # ast.parse on bytes honours the file's coding declaration.
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError):
        # Not all .py files in a stdlib are valid for this interpreter (e.g. Python 2 grammar samples).
        return None
    docs = list(_node_docstrings(tree))
    return "\n\n".join(docs) if docs else None


@functools.lru_cache(maxsize=1)
def _documents() -> tuple[str, ...]:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    docs = [topics[name] for name in sorted(topics)]
    docs += [doc for doc in map(_module_document, _stdlib_files()) if doc is not None]
    return tuple(_SURROGATES.sub("\ufffd", doc) for doc in docs if doc.strip())


def embedded_corpus(max_chars: int | None = None) -> Iterator[str]:
    """Yield the embedded corpus one document at a time (pydoc topics first, then stdlib module docstrings).

    With `max_chars`, stop once that many characters have been yielded; the last document is cut short so the
    total is exactly `max_chars` (or the whole corpus if it is smaller).
    """
    if max_chars is not None and max_chars < 0:
        raise ValueError(f"max_chars must be >= 0, got {max_chars}")
    remaining = max_chars
    for doc in _documents():
        if remaining is not None:
            if remaining <= 0:
                return
            doc = doc[:remaining]
            remaining -= len(doc)
        yield doc


def embedded_corpus_info() -> dict:
    """Size and identity of the embedded corpus on this interpreter.

    Returns ``num_docs``, ``num_chars``, ``python_version`` and ``sha256`` (hex digest of the UTF-8 encoding of all
    documents concatenated in order), so a run can record exactly which text it trained on.
    """
    docs = _documents()
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(doc.encode("utf-8"))
    return {
        "num_docs": len(docs),
        "num_chars": sum(map(len, docs)),
        "python_version": sys.version.split()[0],
        "sha256": digest.hexdigest(),
    }


def write_corpus_shards(out_dir: str | os.PathLike, num_shards: int = 4, max_chars: int | None = None) -> list[str]:
    """Write the corpus as `shard_NNNNN.jsonl` files (a `text` column each, documents dealt round-robin), the
    layout the pretraining stream reads; as in nanochat, the last shard is the validation split."""
    import json
    from pathlib import Path

    if num_shards < 2:
        raise ValueError(f"num_shards must be >= 2 (the last shard is the validation split), got {num_shards}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = list(embedded_corpus(max_chars))
    paths = []
    for shard in range(num_shards):
        path = out / f"shard_{shard:05d}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in docs[shard::num_shards])
        paths.append(str(path))
    return paths
