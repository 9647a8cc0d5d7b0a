"""nanochat's tokenizer on Hugging Face tokenizers: rustbpe parity, byte-exact round trips, special tokens, token
bytes, save/load, the chat template against nanochat's render_conversation, the CLI and the text readers."""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import unicodedata

import pytest
import regex
import torch
from transformers import AutoTokenizer

from nanochat_hf.data.embedded import embedded_corpus, embedded_corpus_info
from nanochat_hf.tokenizer.bpe import (
    CHAT_TEMPLATE,
    EVAL_SAMPLES,
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    _training_pattern,
    _training_view,
    compression_stats,
    encode,
    iter_texts,
    load_tokenizer,
    token_bytes,
    tokenizer_from_merges,
    train_tokenizer,
)
from nanochat_hf.tokenizer.cli import add_tokenizer_parser

from . import nanochat_constants as nc
from .nanochat_reference import render_conversation

# nanochat's literal pattern, not the package's: the oracles below (regex, rustbpe, tiktoken) must split as nanochat
SPLIT_RE = regex.compile(nc.SPLIT_PATTERN)

TRICKY_TEXTS = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows\rnewlines\n\n\n",
    "NUL\x00byte and \x01\x1c\x1f\x7f controls",
    "emoji 🙂🚀 ZWJ 👩‍💻👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 skin 👍🏽",
    "CJK 你好，世界。日本語のテキスト、カタカナ。한국어 문장입니다.",
    "combining e\u0301 a\u0308 n\u0303 and Zalgo z\u0336\u0353a\u0337l\u0338g\u0335o",
    "RTL: שלום עולם, مرحبا بالعالم\u200f and bidi \u202eoverride\u202c",
    "odd spaces:\u00a0\u2009\u3000\u2028\u2029\x85\u200b\ufeff end",
    "contractions: it's we'LL they've I'D ſ's 'S",
    "numbers 1234567 ٣٤٥ ① ²³ 3.14159 -42",
    "<|bos|> looks special <|assistant_end|> but is text",
    "\ufffd replacement and \U0010fffd private and \uffff noncharacter",
]


def nanochat_like_corpus(seed: int = 0, n_docs: int = 1500) -> list[str]:
    """Varied short documents mixing scripts, emoji, whitespace and punctuation, plus random characters that every
    regex engine classifies alike (assigned in Python's Unicode database, same letter/number class as `regex`)."""
    rng = random.Random(seed)
    pieces = [
        "hello", " world", " the", " of", "café", " naïve", "中文字符", "日本語", " 한국어", "🙂", "👩‍💻", "e\u0301",
        "\u00a0", "\u3000", "\r\n", "\n", "\t", " ", "  ", "'s", "'LL", "ſ", "123", "٣٤", "²", "!!", "...", "—",
        "“q”", "\x00", "\x1c", "\x0b", "ÿ", "Ā", "ā", "Ă", "aaaa", "abab",
    ]  # fmt: skip
    letter, number = regex.compile(r"\p{L}"), regex.compile(r"\p{N}")

    def stable(ch: str) -> bool:
        cat = unicodedata.category(ch)
        return (
            cat not in ("Cn", "Co", "Cs")
            and (letter.match(ch) is not None) == cat.startswith("L")
            and (number.match(ch) is not None) == cat.startswith("N")
        )

    docs = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 50))) for _ in range(n_docs)]
    for _ in range(n_docs // 10):
        chars = []
        while len(chars) < 30:
            ch = chr(rng.randint(0, 0x10FFFF) if rng.random() < 0.3 else rng.randint(0, 0x3000))
            if stable(ch):
                chars.append(ch)
        docs.append("".join(chars))
    rng.shuffle(docs)
    return docs


def random_unicode_text(rng: random.Random, length: int) -> str:
    """Any code points except surrogates, weighted towards ASCII and the BMP."""
    out = []
    while len(out) < length:
        r = rng.random()
        cp = rng.randint(0, 0x7F) if r < 0.4 else rng.randint(0x80, 0xFFFF) if r < 0.8 else rng.randint(0, 0x10FFFF)
        if not 0xD800 <= cp <= 0xDFFF:
            out.append(chr(cp))
    return "".join(out)


def gpt2_char_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte -> character map (printable Latin-1 bytes are themselves, the rest U+0100 on)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(0x100 + i): b for i, b in enumerate(others)}}


CHAR_TO_BYTE = gpt2_char_to_byte()


def to_bytes(token: str) -> bytes:
    return bytes(CHAR_TO_BYTE[c] for c in token)


def token_bytes_in_id_order(tokenizer) -> list[bytes]:
    """The regular tokens' bytes in id order, read from the byte-level vocabulary strings."""
    inverse = {i: t for t, i in tokenizer.get_vocab().items() if t not in SPECIAL_TOKENS}
    return [to_bytes(inverse[i]) for i in range(len(inverse))]


def learned_tokens(tokenizer) -> list[bytes]:
    """The tokens in id order, after checking that tokenizer.json's merges, in order, build exactly tokens 256..:
    merge i joins two earlier tokens into token 256 + i."""
    tokens = token_bytes_in_id_order(tokenizer)
    assert tokens[:256] == [bytes([b]) for b in range(256)]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    ids = {t: i for i, t in enumerate(tokens)}
    for i, (a, b) in enumerate(merges):
        left, right = to_bytes(a), to_bytes(b)
        assert left + right == tokens[256 + i] and max(ids[left], ids[right]) < 256 + i
    assert len(merges) == len(tokens) - 256
    return tokens


@pytest.fixture(scope="module")
def tok():
    """A 2048-token tokenizer trained on ~600K characters of the embedded corpus plus varied Unicode."""
    docs = list(embedded_corpus(max_chars=600_000)) + nanochat_like_corpus(seed=1, n_docs=300)
    return train_tokenizer(docs, 2048, show_progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Training: parity with rustbpe (nanochat's trainer)


def rustbpe_tokens(docs: list[str], vocab_size: int, doc_cap: int | None = 10_000) -> list[bytes]:
    rustbpe = pytest.importorskip("rustbpe")
    bpe = rustbpe.Tokenizer()
    capped = [d[:doc_cap] if doc_cap else d for d in docs]
    bpe.train_from_iterator(iter(capped), vocab_size - len(SPECIAL_TOKENS), pattern=nc.SPLIT_PATTERN)
    return [bytes(t) for t, _ in sorted(bpe.get_mergeable_ranks(), key=lambda item: item[1])]


def test_split_pattern_is_nanochats():
    assert SPLIT_PATTERN == nc.SPLIT_PATTERN


def test_parity_with_rustbpe_on_ties():
    """A few KB at a tiny vocabulary: most merges are decided by count ties, broken by the smaller pair ids."""
    docs = list(embedded_corpus(max_chars=4000)) + ["aaaa abab aaa ba ab " * 3, "xyxyxy yx xy", "\t\t  \n\n"]
    vocab_size = 256 + len(SPECIAL_TOKENS) + 60
    expected = rustbpe_tokens(docs, vocab_size)
    assert len(expected) == vocab_size - len(SPECIAL_TOKENS)
    assert learned_tokens(train_tokenizer(docs, vocab_size, show_progress=False)) == expected


def test_parity_with_rustbpe_on_embedded_corpus():
    docs = list(embedded_corpus(max_chars=1_500_000))
    tokenizer = train_tokenizer(docs, 2048, show_progress=False)
    assert learned_tokens(tokenizer) == rustbpe_tokens(docs, 2048)
    assert tokenizer.convert_ids_to_tokens(list(range(2048 - 9, 2048))) == list(SPECIAL_TOKENS)


def test_parity_with_rustbpe_and_tiktoken_on_varied_unicode():
    """Text that is mostly non-ASCII exercises the pre-split windows; the encodings then also match tiktoken's
    (nanochat's inference tokenizer) on the same ranks."""
    docs = nanochat_like_corpus(seed=2)
    expected = rustbpe_tokens(docs, 2048)
    tokenizer = train_tokenizer(docs, 2048, show_progress=False)
    assert learned_tokens(tokenizer) == expected
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {token: i for i, token in enumerate(expected)}
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding("nanochat", pat_str=nc.SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    for doc in docs[:300] + TRICKY_TEXTS:
        assert encode(tokenizer, doc) == enc.encode_ordinary(doc), doc


def test_parity_with_rustbpe_at_32k():
    """nanochat's default vocabulary size on the whole embedded corpus (~5 s)."""
    docs = list(embedded_corpus()) + nanochat_like_corpus(seed=3, n_docs=5000)
    expected = rustbpe_tokens(docs, 32768)
    assert len(expected) == 32768 - len(SPECIAL_TOKENS)
    assert learned_tokens(train_tokenizer(docs, 32768, show_progress=False)) == expected


def test_doc_cap_and_max_chars_follow_nanochat():
    docs = ["abc " * 50, "xyz " * 50, "never read " * 50]
    capped = train_tokenizer(docs, 300, doc_cap=20, max_chars=30, show_progress=False)
    # nanochat stops after the document that takes the total past max_chars: the first two, cut to 20 chars.
    assert token_bytes_in_id_order(capped) == rustbpe_tokens([d[:20] for d in docs[:2]], 300, doc_cap=None)
    assert b" never" not in token_bytes_in_id_order(capped)


def test_training_view_splits_like_the_regex():
    """The trainer splits each document's byte view (one character per UTF-8 byte) with a transcription of the regex;
    its pieces must be the regex's chunks of the text, byte for byte, whatever the characters."""
    from tokenizers import Regex, pre_tokenizers

    splitter = pre_tokenizers.Split(Regex(_training_pattern()), behavior="isolated")
    rng = random.Random(0)
    alphabet = list("ab Z9\n\r\t .'s,!?-_") + ["é", "\u00a0", "中", "²", "\x1c", "\x85", "🙂", "ll", "  ", "\r\n"]
    alphabet += ["ſ", "'", "\u212a", "\x00", "\x7f", "ÿ", "\u3000", "٣", "\U0001d7d8"]
    texts = TRICKY_TEXTS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    texts += [random_unicode_text(rng, 60) for _ in range(300)]
    for text in texts:
        pieces = [piece.encode("latin-1") for piece, _ in splitter.pre_tokenize_str(_training_view(text))]
        assert pieces == [chunk.encode("utf-8") for chunk in SPLIT_RE.findall(text)], text


def test_training_rejects_bad_input():
    with pytest.raises(ValueError, match=r"lone surrogate U\+D800 at index 2; .*\(document 1 of the training"):
        train_tokenizer(["fine", "ab\ud800"], 300, show_progress=False)
    with pytest.raises(ValueError, match="at least 265"):
        train_tokenizer(["x"], 264, show_progress=False)
    with pytest.raises(TypeError, match="must be str"):
        train_tokenizer([b"bytes"], 300, show_progress=False)
    with pytest.raises(TypeError, match="not a single string"):
        train_tokenizer("one long document", 300, show_progress=False)


def test_training_keeps_tokenizers_parallelism_setting(monkeypatch):
    """Training switches TOKENIZERS_PARALLELISM off for its merge loop only, and leaves the variable as it found it."""
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    train_tokenizer(["hello world"] * 3, 270, show_progress=False)
    assert "TOKENIZERS_PARALLELISM" not in os.environ
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    train_tokenizer(["hello world"] * 3, 270, show_progress=False)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"


# ---------------------------------------------------------------------------------------------------------------
# Encoding


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_round_trip_tricky_text(tok, text):
    ids = encode(tok, text)
    assert tok.decode(ids) == text
    assert b"".join(token_bytes_in_id_order(tok)[i] for i in ids) == text.encode("utf-8")


def test_round_trip_random_code_points(tok):
    rng = random.Random(1234)
    for _ in range(300):
        text = random_unicode_text(rng, rng.randint(0, 80))
        assert tok.decode(encode(tok, text)) == text


def test_lone_surrogate_is_a_clear_error(tok):
    with pytest.raises(ValueError, match=r"lone surrogate U\+D800 at index 5; it cannot be encoded as UTF-8"):
        encode(tok, "hello\ud800world")
    with pytest.raises(ValueError, match=r"U\+DC80 at index 0"):
        encode(tok, "\udc80")


def test_special_tokens_are_the_last_nine_ids(tok):
    n = len(tok)
    assert n == 2048
    assert [tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS] == list(range(n - 9, n))
    assert tok.bos_token == "<|bos|>" and tok.bos_token_id == n - 9
    assert tok.eos_token == tok.pad_token == "<|assistant_end|>"


def test_encode_never_parses_special_tokens(tok):
    """nanochat's encode treats special-token strings as text; the HF call convention (used by chat templates)
    parses them."""
    text = "a<|bos|>b<|assistant_end|>"
    ids = encode(tok, text)
    assert not set(ids) & set(range(len(tok) - 9, len(tok)))
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids("<|bos|>") in tok(text, add_special_tokens=False)["input_ids"]


def test_bos_is_prepended_only_when_asked(tok):
    bos = tok.bos_token_id
    plain = encode(tok, "hi there")
    assert encode(tok, "hi there", prepend_bos=True) == [bos, *plain]
    assert tok("hi there")["input_ids"] == [bos, *plain]
    assert tok("hi there", add_special_tokens=False)["input_ids"] == plain
    assert tok.decode(encode(tok, "x  y ")) == "x  y "  # no clean-up of spaces


def test_token_bytes(tok):
    counts = token_bytes(tok)
    assert counts.dtype == torch.int32 and counts.shape == (len(tok),)
    assert counts[-9:].tolist() == [0] * 9
    assert counts[:256].tolist() == [1] * 256  # includes 0x80..0xFF, which do not decode to one character
    vocab = token_bytes_in_id_order(tok)
    assert counts[:-9].tolist() == [len(b) for b in vocab]
    for text in TRICKY_TEXTS:
        assert int(counts[encode(tok, text)].sum()) == len(text.encode("utf-8"))


def test_tokenizer_from_merges_reproduces_the_trained_tokenizer(tok):
    vocab = {t: i for i, t in enumerate(token_bytes_in_id_order(tok))}
    spec = json.loads(tok.backend_tokenizer.to_str())
    merges = [(to_bytes(a), to_bytes(b)) for a, b in spec["model"]["merges"]]
    rebuilt = tokenizer_from_merges(vocab, merges)
    assert json.loads(rebuilt.backend_tokenizer.to_str()) == spec
    with pytest.raises(ValueError, match="contiguous"):
        tokenizer_from_merges({b"a": 1}, [])


def test_compression_stats(tok):
    stats = compression_stats(tok)
    assert set(stats) == set(EVAL_SAMPLES)
    for kind, s in stats.items():
        assert s["bytes"] == len(EVAL_SAMPLES[kind].encode("utf-8"))
        assert s["bytes_per_token"] == pytest.approx(s["bytes"] / s["tokens"])
        assert 1.0 <= s["bytes_per_token"] < 10
    assert stats["news"]["bytes_per_token"] > stats["korean"]["bytes_per_token"]


# ---------------------------------------------------------------------------------------------------------------
# save_pretrained / AutoTokenizer


def test_save_and_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    # the only normalizer undoes the chat template's escape of message text (tests/test_chat_input.py)
    assert spec["normalizer"] == {"type": "Replace", "pattern": {"String": "\ufdd0|"}, "content": "|"}
    assert spec["decoder"]["type"] == "ByteLevel"
    assert not list(tmp_path.glob("*.py"))
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path)).get_vocab() == tok.get_vocab()
    for text in TRICKY_TEXTS:
        assert encode(loaded, text) == encode(tok, text)
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        assert loaded.decode(encode(loaded, text)) == text
    conversation = CONVERSATIONS["tool_calls"][0]
    assert loaded.chat_template == CHAT_TEMPLATE
    assert loaded.apply_chat_template(conversation, tokenize=False) == tok.apply_chat_template(
        conversation, tokenize=False
    )
    prompt = loaded.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|bos|><|user_start|>hi<|user_end|><|assistant_start|>"
    assert token_bytes(loaded).tolist() == token_bytes(tok).tolist()


# ---------------------------------------------------------------------------------------------------------------
# Chat template vs nanochat's render_conversation (nanochat-spec.md §3.1), restated here from the spec


def _call(code: str, as_json: bool = False, key: str = "code") -> dict:
    arguments = json.dumps({key: code}) if as_json else {key: code}
    return {"type": "function", "function": {"name": "python", "arguments": arguments}}


# name -> (conversation in the Hugging Face format our template reads, the same conversation in nanochat's format)
CONVERSATIONS = {
    "multi_turn": (
        [
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "What's 2+2?"},
            {"role": "assistant", "content": "4"},
        ],
        None,
    ),
    "system": (
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
        ],
        None,
    ),
    "parts": (
        [
            {"role": "user", "content": "What is 12*3?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me compute. "},
                    {"type": "python", "text": "12*3"},
                    {"type": "python_output", "text": "36"},
                    {"type": "text", "text": "It is 36."},
                ],
            },
        ],
        None,
    ),
    "tool_calls": (
        [
            {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "12*3?"}]},
            {"role": "assistant", "content": "Computing. ", "tool_calls": [_call("12*3")]},
            {"role": "tool", "content": "36"},
            {"role": "assistant", "content": "Then ", "tool_calls": [_call("36+1", as_json=True)]},
            {"role": "tool", "content": "37"},
            {"role": "assistant", "content": "It is 36, plus one is 37."},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "You're welcome."},
        ],
        [
            {"role": "user", "content": "What is 12*3?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Computing. "},
                    {"type": "python", "text": "12*3"},
                    {"type": "python_output", "text": "36"},
                    {"type": "text", "text": "Then "},
                    {"type": "python", "text": "36+1"},
                    {"type": "python_output", "text": "37"},
                    {"type": "text", "text": "It is 36, plus one is 37."},
                ],
            },
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "You're welcome."},
        ],
    ),
    "unicode": (
        [
            {"role": "system", "content": "Réponds en français 🇫🇷"},
            {"role": "user", "content": "“Bonjour” — ça va? 你好\n\tNUL\x00"},
            {"role": "assistant", "content": "Très bien 🙂 merci!  \n"},
            {"role": "user", "content": "Calcule 2²"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [_call('print("é🙂", 2**2)', as_json=True, key="expression")],
            },
            {"role": "tool", "content": "é🙂 4"},
        ],
        [
            {"role": "system", "content": "Réponds en français 🇫🇷"},
            {"role": "user", "content": "“Bonjour” — ça va? 你好\n\tNUL\x00"},
            {"role": "assistant", "content": "Très bien 🙂 merci!  \n"},
            {"role": "user", "content": "Calcule 2²"},
            {
                "role": "assistant",
                "content": [
                    {"type": "python", "text": 'print("é🙂", 2**2)'},
                    {"type": "python_output", "text": "é🙂 4"},
                ],
            },
        ],
    ),
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_template_matches_render_conversation(tok, name):
    hf_messages, nanochat_messages = CONVERSATIONS[name]
    expected_ids, expected_mask = render_conversation(tok, nanochat_messages or hf_messages)
    out = tok.apply_chat_template(hf_messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"] == expected_ids
    assert out["assistant_masks"] == expected_mask


def test_chat_template_generation_prompt(tok):
    user = {"role": "user", "content": "12*3?"}
    assert tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True).endswith(
        "<|user_end|><|assistant_start|>"
    )
    # After a tool result the model continues the same assistant turn: no <|assistant_end|>, no new start.
    pending = [user, {"role": "assistant", "tool_calls": [_call("12*3")]}, {"role": "tool", "content": "36"}]
    prompt = tok.apply_chat_template(pending, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|python_start|>12*3<|python_end|><|output_start|>36<|output_end|>")
    closed = tok.apply_chat_template(pending, tokenize=False)
    assert closed.endswith("<|output_end|><|assistant_end|>")
    # A call still waiting for its result leaves the turn open too (renders stay prefix-preserving).
    waiting = tok.apply_chat_template(pending[:2], tokenize=False)
    assert waiting.endswith("<|assistant_start|><|python_start|>12*3<|python_end|>") and prompt.startswith(waiting)


def test_chat_template_renders_other_tools_as_python_calls(tok):
    def render(arguments) -> str:
        call = {"type": "function", "function": {"name": "multiply", "arguments": arguments}}
        messages = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call]}]
        return tok.apply_chat_template(messages, tokenize=False).split("<|python_start|>")[1]

    assert render({"a": 2, "b": "é"}) == 'multiply(**{"a": 2, "b": "é"})<|python_end|>'
    assert render('{"a": 2}') == 'multiply(**{"a": 2})<|python_end|>'
    assert render({}) == "multiply()<|python_end|>"
    assert render("6*7") == "6*7<|python_end|>"  # a bare string is the code itself
    assert render('{"expression": "2**10", "note": "\\"x\\""}') == "2**10<|python_end|>"


def test_chat_template_passes_trl_checks(tok):
    """TRL's SFT (assistant_only_loss) and GRPO (tools) accept the template as is, without swapping in their own."""
    utils = pytest.importorskip("trl.chat_template_utils")
    assert utils.has_generation_markers(tok.chat_template)
    assert utils.is_chat_template_stop_token_trained(tok)
    assert utils.supports_tool_calling(tok)
    assert utils.is_chat_template_prefix_preserving(tok)
    assert utils.get_training_chat_template(tok) is None


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([{"role": "assistant", "content": "x"}], "message 0: the conversation must start with a user message"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1: two user messages"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant"}],
            "message 2: two assistant messages",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "tool", "content": "1"}],
            "message 1: a tool message must follow",
        ),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "tool", "content": "1"},
            ],
            "message 2: a tool message must follow an assistant message with tool_calls",
        ),
        ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "message 1: unknown role robot"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only allowed as the first message"),
        ([{"role": "system", "content": "s"}], "a system message must be followed by a user message"),
        ([{"role": "user", "content": [{"type": "image"}]}], 'may only hold {"type": "text"} blocks, got image'),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "html", "text": "b"}]}],
            "unknown assistant content part type html",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}],
            'a tool call needs a function name or a "code" \\(or "expression"\\) argument',
        ),
    ],
)
def test_chat_template_errors(tok, messages, error):
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match=error):
        tok.apply_chat_template(messages, tokenize=False)


# ---------------------------------------------------------------------------------------------------------------
# CLI


def run_cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="nanochat-hf")
    add_tokenizer_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_cli_train_and_eval(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    docs = list(embedded_corpus(max_chars=200_000))
    for i, doc in enumerate(docs[:20]):
        (data / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    rows = [json.dumps({"text": doc, "id": i}) for i, doc in enumerate(docs[20:])]
    (data / "sub" / "rows.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "tok"
    run_cli(["tokenizer", "train", "--data", str(data), "--out", str(out), "--vocab-size", "512", "--no-progress"])
    assert {p.name for p in out.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "tokenizer_training.json"}
    info = json.loads((out / "tokenizer_training.json").read_text())
    assert info["vocab_size"] == 512 and info["documents"] == len(docs)
    assert info["characters"] == sum(len(d[:10_000]) for d in docs)
    loaded = load_tokenizer(str(out))
    assert len(loaded) == 512 and loaded.decode(encode(loaded, docs[3])) == docs[3]
    assert "trained a 512-token tokenizer" in capsys.readouterr().out

    with pytest.raises(ValueError, match="--overwrite"):
        run_cli(["tokenizer", "train", "--data", str(data), "--out", str(out), "--vocab-size", "300"])
    run_cli(["tokenizer", "train", "--data", str(data), "--out", str(out), "--vocab-size", "300", "--overwrite"])
    assert len(load_tokenizer(str(out))) == 300

    report = tmp_path / "eval.json"
    run_cli(
        ["tokenizer", "eval", str(out), "--data", str(data / "sub"), "--data-chars", "5000", "--json", str(report)]
    )
    printed = capsys.readouterr().out
    assert "korean" in printed and "b/t" in printed
    stats = json.loads(report.read_text())[str(out)]
    assert stats["vocab_size"] == 300 and set(stats["stats"]) == {*EVAL_SAMPLES, "sub"}
    assert stats["stats"]["sub"]["chars"] == 5000


@pytest.mark.parametrize("action", ["train", "eval"])
def test_cli_help(action, capsys):
    with pytest.raises(SystemExit):
        run_cli(["tokenizer", action, "--help"])
    text = capsys.readouterr().out
    assert "usage:" in text and ("rustbpe" in text if action == "train" else "bytes per token" in text)


# ---------------------------------------------------------------------------------------------------------------
# iter_texts and the embedded corpus


def test_iter_texts_reads_txt_jsonl_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    (tmp_path / "a.txt").write_text("first\ndocument", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "row 1"}\n\n{"text": "row 2", "x": 1}\n', encoding="utf-8")
    pq.write_table(pa.table({"content": ["p1", None, "p2"]}), tmp_path / "c.parquet")
    (tmp_path / "ignored.csv").write_text("x", encoding="utf-8")
    assert list(iter_texts([tmp_path / "a.txt", tmp_path / "b.jsonl"])) == ["first\ndocument", "row 1", "row 2"]
    assert list(iter_texts(str(tmp_path / "c.parquet"), text_column="content")) == ["p1", "p2"]


def test_iter_texts_errors(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    (tmp_path / "rows.jsonl").write_text('{"text": "ok"}\n{"body": "no text", "id": 2}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: no column 'text'; this row has \['body', 'id'\]"):
        list(iter_texts([tmp_path / "rows.jsonl"]))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"t\.parquet: no column 'text'; the file has columns \['body'\]"):
        list(iter_texts([tmp_path / "t.parquet"]))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not valid UTF-8 at byte offset 3"):
        list(iter_texts([tmp_path / "latin1.txt"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no .txt/.jsonl/.parquet files"):
        list(iter_texts([tmp_path / "empty"]))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        list(iter_texts([tmp_path / "missing.txt"]))
    (tmp_path / "x.csv").write_text("a", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported file type"):
        list(iter_texts([tmp_path / "x.csv"]))


def test_embedded_corpus():
    info = embedded_corpus_info()
    docs = list(embedded_corpus())
    assert info["num_docs"] == len(docs) > 100
    assert info["num_chars"] == sum(map(len, docs)) > 1_000_000
    assert len(info["sha256"]) == 64 and info["python_version"]
    assert list(embedded_corpus()) == docs  # deterministic
    assert sum(map(len, embedded_corpus(max_chars=12_345))) == 12_345
    assert all(not any(0xD800 <= ord(c) <= 0xDFFF for c in d) for d in docs)
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    assert docs[: len(topics)] == [topics[name] for name in sorted(topics)]  # pydoc topics first, then docstrings


def test_checkpoint_tokenizer_loads_in_a_fresh_process_with_stdin_closed(tiny_checkpoint, tmp_path):
    """AutoTokenizer on a saved model folder, in a process that never imported nanochat_hf: no trust_remote_code,
    nothing typed on stdin, and the model's context (256 tokens) as model_max_length."""
    script = (
        "import sys; from transformers import AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "print('MAX', tok.model_max_length, tok.decode(tok('hello world')['input_ids']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tiny_checkpoint)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "MAX 256 <|bos|>hello world" in result.stdout
    # transformers 5.24's AutoTokenizer reads config.json through AutoConfig first, which still prints its
    # trust_remote_code question for the folder's auto_map; closed stdin answers it "no" and loading goes on.
