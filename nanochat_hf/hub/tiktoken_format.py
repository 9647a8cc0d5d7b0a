"""nanochat's tokenizer files: `tokenizer.pkl` (a pickled `tiktoken.Encoding`, read without running the pickle's
code) and `token_bytes.pt`, and the conversion between tiktoken's ranks and a Hugging Face byte-level BPE.
"""

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..tokenizer.bpe import _BYTE_TO_CHAR, _CHAR_TO_BYTE, chat_escape_normalizer  # _*: the GPT-2 byte alphabet we use
from .nanochat_format import ConversionError, PathLike

# ---------------------------------------------------------------------------------------------------------------
# tiktoken pickles, without running the pickle's code


@dataclass
class TiktokenState:
    """What a pickled `tiktoken.Encoding` holds (its `__getstate__` dict)."""

    name: str
    pat_str: str
    mergeable_ranks: dict[bytes, int]
    special_tokens: dict[str, int]

    @property
    def vocab_size(self) -> int:
        return len(self.mergeable_ranks) + len(self.special_tokens)


class _CapturedEncoding:
    """Stands in for `tiktoken.core.Encoding` while unpickling: keeps the state instead of building an encoder."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _TiktokenUnpickler(pickle.Unpickler):
    # A pickle can run arbitrary code; a tokenizer.pkl only needs tiktoken's Encoding class, so every other global
    # is refused except the harmless helpers old protocols (0-2) use: copyreg's reconstructor for objects and
    # `_codecs.encode` for bytes, under their Python 2 names too (the base class maps those back).
    _ALLOWED = {
        ("copyreg", "_reconstructor"),
        ("copy_reg", "_reconstructor"),
        ("builtins", "object"),
        ("__builtin__", "object"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in {("tiktoken.core", "Encoding"), ("tiktoken", "Encoding")}:
            return _CapturedEncoding
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (not part of a tiktoken Encoding)")


def read_tiktoken_pickle(path: PathLike) -> TiktokenState:
    """The ranks, pattern and special tokens of nanochat's `tokenizer.pkl`. Needs neither tiktoken nor trust:
    the pickle is read with an unpickler that only accepts `tiktoken.Encoding`."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: file not found")
    try:
        with path.open("rb") as f:
            obj = _TiktokenUnpickler(f).load()
    except Exception as err:
        raise ConversionError(
            f"{path}: cannot be read as a pickled tiktoken Encoding ({type(err).__name__}: {err})"
        ) from err
    state = obj.state if isinstance(obj, _CapturedEncoding) else None
    if isinstance(state, str):
        raise ConversionError(
            f"{path}: refers to tiktoken's built-in encoding {state!r} by name, not to a nanochat tokenizer"
        )
    if not isinstance(state, dict) or not {"pat_str", "mergeable_ranks", "special_tokens"} <= set(state):
        got = type(state).__name__ if isinstance(obj, _CapturedEncoding) else type(obj).__name__
        raise ConversionError(f"{path}: not a pickled tiktoken Encoding (got {got})")
    ranks, specials = state["mergeable_ranks"], state["special_tokens"]
    for name, value, kind in (("pat_str", state["pat_str"], str), ("mergeable_ranks", ranks, dict),
                              ("special_tokens", specials, dict)):
        if not isinstance(value, kind):
            raise ConversionError(f"{path}: the Encoding's {name} has type {type(value).__name__}, not {kind.__name__}; "
                                  "the file is damaged or not nanochat's tokenizer.pkl")
    if not all(isinstance(k, bytes) and isinstance(v, int) for k, v in ranks.items()):
        raise ConversionError(f"{path}: mergeable_ranks must map bytes to int")
    if not all(isinstance(k, str) and isinstance(v, int) for k, v in specials.items()):
        raise ConversionError(f"{path}: special_tokens must map str to int")
    from tokenizers import Regex

    try:
        Regex(state["pat_str"])  # compiled by the engine our pre-tokenizer will run it with
    except Exception as err:  # tokenizers raises a bare Exception for a pattern it cannot compile
        raise ConversionError(f"{path}: the Encoding's pat_str is not a valid regex ({err})") from err
    return TiktokenState(str(state.get("name", "")), state["pat_str"], dict(ranks), dict(specials))


def _import_tiktoken():
    # tiktoken is only needed here, to write nanochat's tokenizer.pkl, so it is an optional dependency. The error is
    # a ConversionError so the CLI reports it as one line, before anything is written.
    try:
        import tiktoken
    except ImportError as err:
        raise ConversionError(
            "writing nanochat's tokenizer.pkl needs tiktoken (nanochat pickles a tiktoken.Encoding): "
            "pip install tiktoken"
        ) from err
    return tiktoken


def write_tiktoken_pickle(state: TiktokenState, path: PathLike) -> None:
    """Pickle a real `tiktoken.Encoding`, as nanochat's `RustBPETokenizer.save` does."""
    tiktoken = _import_tiktoken()
    encoding = tiktoken.Encoding(
        name=state.name or "rustbpe",
        pat_str=state.pat_str,
        mergeable_ranks=state.mergeable_ranks,
        special_tokens=state.special_tokens,
    )
    with Path(path).open("wb") as f:
        pickle.dump(encoding, f)


def nanochat_token_bytes(state: TiktokenState) -> torch.Tensor:
    """nanochat HEAD's token_bytes.pt: int32 byte length of every id, 0 for the special tokens."""
    lengths = torch.zeros(state.vocab_size, dtype=torch.int32)
    for token, rank in state.mergeable_ranks.items():
        lengths[rank] = len(token)
    return lengths


# ---------------------------------------------------------------------------------------------------------------
# tiktoken <-> Hugging Face byte-level BPE


def _bytes_to_token(token: bytes) -> str:
    return "".join(_BYTE_TO_CHAR[b] for b in token)


def _token_to_bytes(token: str) -> bytes:
    return bytes(_CHAR_TO_BYTE[c] for c in token)


def _bpe_split(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """tiktoken's BPE on `token`'s bytes using only ranks lower than `below`: repeatedly merge the adjacent pair
    whose concatenation has the lowest rank (leftmost on ties)."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_rank = -1, below
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def recover_merges(ranks: dict[bytes, int], source: Path) -> list[tuple[bytes, bytes]]:
    """The merge list a byte-level BPE needs to reproduce tiktoken's encoding, in priority (= rank) order.

    tiktoken stores only ranks. Running its BPE on each token's bytes with the ranks below the token's own leaves
    exactly the two parts the token was merged from; the merge's priority is the token's rank.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = _bpe_split(token, ranks, rank)
        if len(parts) != 2:
            raise ConversionError(
                f"{source}: token {token!r} (id {rank}) cannot be built by merging two lower-ranked tokens, so no "
                "BPE merge list reproduces this vocabulary"
            )
        merges.append((parts[0], parts[1]))
    return merges


def _check_nanochat_vocab(state: TiktokenState, source: Path) -> None:
    """ids 0..N-1 for the byte tokens and merges, N.. for nanochat's 9 special tokens (nanochat's layout)."""
    from ..tokenizer.bpe import SPECIAL_TOKENS

    n = len(state.mergeable_ranks)
    if sorted(state.mergeable_ranks.values()) != list(range(n)):
        raise ConversionError(f"{source}: token ranks are not the contiguous ids 0..{n - 1}")
    missing_bytes = [b for b in range(256) if bytes([b]) not in state.mergeable_ranks]
    if missing_bytes:
        raise ConversionError(
            f"{source}: byte tokens missing for bytes {missing_bytes[:8]} (byte-level BPE needs all 256)"
        )
    if set(state.special_tokens) != set(SPECIAL_TOKENS):
        raise ConversionError(
            f"{source}: special tokens {sorted(state.special_tokens)} differ from nanochat's {list(SPECIAL_TOKENS)}"
        )
    if sorted(state.special_tokens.values()) != list(range(n, n + len(SPECIAL_TOKENS))):
        raise ConversionError(
            f"{source}: special token ids {sorted(state.special_tokens.values())} are not the ids right after the "
            f"{n} regular tokens"
        )


def tiktoken_to_hf(state: TiktokenState, source: PathLike):
    """A transformers fast tokenizer (tokenizer.json) with the same id for every token as the tiktoken encoding,
    laid out like nanochat_hf's own tokenizers (regex split + byte-level BPE) and carrying our chat template."""
    from tokenizers import AddedToken, Tokenizer, models

    from ..tokenizer import bpe as tok

    source = Path(source)
    _check_nanochat_vocab(state, source)
    vocab = {_bytes_to_token(token): rank for token, rank in state.mergeable_ranks.items()}
    merges = [(_bytes_to_token(a), _bytes_to_token(b)) for a, b in recover_merges(state.mergeable_ranks, source)]
    # ignore_merges: like tiktoken, a pre-token that is itself in the vocabulary is emitted whole.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.configure_pipeline(backend, pattern=state.pat_str)
    ordered = sorted(state.special_tokens.items(), key=lambda item: item[1])
    backend.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in ordered])
    for name, token_id in ordered:
        if backend.token_to_id(name) != token_id:
            raise ConversionError(
                f"{source}: special token {name} would get id {backend.token_to_id(name)}, not {token_id}"
            )
    return tok.wrap_backend(backend)


def _split_pattern(pre_tokenizer: dict | None, source: Path) -> str:
    """The regex of a tokenizer.json pre-tokenizer laid out as Split(regex, isolated) + ByteLevel(no regex):
    the only layout a tiktoken Encoding (one regex, then byte-level BPE) can express."""
    steps = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer and pre_tokenizer.get("type") == "Sequence" else []
    ok = (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and "Regex" in (steps[0].get("pattern") or {})
        and str(steps[0].get("behavior", "")).lower() == "isolated"
        and not steps[0].get("invert", False)
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex", True)
        and not steps[1].get("add_prefix_space", False)
    )
    if not ok:
        raise ConversionError(
            f"{source}: pre-tokenizer {json.dumps(pre_tokenizer)[:300]} is not Split(regex, isolated) + "
            "ByteLevel(use_regex=False), which is all a tiktoken Encoding can express"
        )
    return steps[0]["pattern"]["Regex"]


def hf_to_tiktoken(tokenizer, source: PathLike) -> TiktokenState:
    """The tiktoken state that encodes exactly like `tokenizer` (a nanochat_hf fast tokenizer)."""
    source = Path(source)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("dropout"):
        raise ConversionError(f"{source}: tokenizer model must be a plain byte-level BPE, got {model.get('type')}")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ConversionError(f"{source}: BPE subword prefixes/suffixes cannot be expressed in tiktoken")
    # The one normalizer allowed undoes the chat template's escape of message text, which tiktoken never sees.
    if spec.get("normalizer") not in (None, json.loads(chat_escape_normalizer().__getstate__())):
        raise ConversionError(
            f"{source}: tokenizer has a normalizer ({spec['normalizer'].get('type')}); tiktoken has none"
        )
    pattern = _split_pattern(spec.get("pre_tokenizer"), source)
    try:
        ranks = {_token_to_bytes(token): token_id for token, token_id in model["vocab"].items()}
    except KeyError as err:
        raise ConversionError(f"{source}: vocabulary token with a character outside the byte-level alphabet") from err
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    state = TiktokenState("rustbpe", pattern, ranks, specials)
    _check_nanochat_vocab(state, source)
    # tiktoken merges by rank alone; the two encode alike only if the stored merges are the ones the ranks imply.
    stored = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    implied = [(_bytes_to_token(a), _bytes_to_token(b)) for a, b in recover_merges(ranks, source)]
    if stored != implied:
        pairs = zip(stored, implied, strict=False)
        first = next((i for i, (s, m) in enumerate(pairs) if s != m), min(len(stored), len(implied)))
        raise ConversionError(
            f"{source}: the BPE merges are not in token-id order (first difference at merge {first}: stored "
            f"{stored[first] if first < len(stored) else None}, id order implies "
            f"{implied[first] if first < len(implied) else None}); tiktoken, which merges by id, would encode "
            "differently"
        )
    return state
