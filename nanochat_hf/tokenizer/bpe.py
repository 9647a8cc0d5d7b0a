"""nanochat's tokenizer as a Hugging Face fast tokenizer: training, chat template, encoding helpers.

nanochat (shared/reference/nanochat-spec.md §3) trains a GPT-4-style byte-level BPE with rustbpe and encodes with
tiktoken. Here the same tokenizer is trained with the `tokenizers` library's Rust ``BpeTrainer`` and saved as a
plain ``tokenizer.json`` that ``AutoTokenizer.from_pretrained`` loads without remote code:

* no normalizer but the chat escape's (below); pre-tokenizer = nanochat's split regex (``Split``, isolated) + ``ByteLevel`` (GPT-2 byte alphabet,
  no prefix space, no regex of its own); ``ByteLevel`` decoder, so decoding is byte-exact;
* ids 0..255 are the byte tokens in byte order, then the merges in the order they were learned, then nanochat's
  9 special tokens as the last 9 ids -- the same id for every token as nanochat's rustbpe/tiktoken tokenizer;
* ``tokenizer(text)`` prepends ``<|bos|>`` (a ``TemplateProcessing`` post-processor), as nanochat does per
  document; ``add_special_tokens=False`` does not;
* ``ignore_merges=True``: like tiktoken, a pre-token that is itself a vocabulary entry is emitted whole.

Special-token strings: ``tokenizer(text)`` follows the Hugging Face convention and turns a literal ``<|bos|>`` in
the text into the special token. nanochat never does (its ``encode`` calls tiktoken's ``encode_ordinary``);
:func:`encode` follows nanochat and encodes such strings as ordinary text (``split_special_tokens=True``).

Chat input is data, never control. ``apply_chat_template`` renders the conversation to text and tokenizes that, so
a ``<|user_end|>`` typed in a message would become the special token. The chat template therefore writes every
``|`` of message text (system, user, assistant, tool calls, tool output) as ``CHAT_ESCAPE + "|"``, which no special
token matches, and tokenizer.json carries one normalizer, ``Replace(CHAT_ESCAPE + "|", "|")``, which the
`tokenizers` pipeline applies after matching special tokens: the text is then encoded as typed. So
``apply_chat_template(..., tokenize=True)`` -- and everything built on it: TRL's SFT/RL, the engine, midtraining,
the chat evals, a server that renders the template and tokenizes the result -- gives exactly nanochat's ids (special
tokens only where the conversation's structure puts them), assistant masks included, with no remote code. The one
cost: plain text containing the two characters U+FDD0 ``|`` (a Unicode noncharacter, reserved for internal use)
encodes as ``|``, where tiktoken would keep the U+FDD0; inside chat messages the escape keeps it.

Training matches rustbpe exactly (same merges in the same order, hence the same ids; tested): both count the same
regex chunks, pick the most frequent pair and break count ties by the smaller (left id, right id). ``BpeTrainer``
numbers its initial alphabet by code point, and the GPT-2 byte alphabet is not in byte order (space is U+0120,
after every printable byte), so training on ``ByteLevel`` output would break ties differently. The trainer instead
sees each document's UTF-8 bytes one character per byte (byte b is U+00b; ASCII text is unchanged), split by a
transcription of the regex to that byte view (see ``_training_pattern``), and the learned vocabulary is translated
to the GPT-2 alphabet afterwards. This also keeps the corpus pass entirely in Rust: no per-chunk ``ByteLevel``
mapping, no Python regex.

Character classes come from the ``regex`` module's Unicode tables; rustbpe's regex crate and Oniguruma (used at
encode time) carry their own. They agree on the characters of Unicode 14 (tested against rustbpe and tiktoken);
characters assigned in later versions may be classed differently by the engines, as between rustbpe's and
tiktoken's builds in nanochat itself.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import regex
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..errors import UsageError, check_source

logger = logging.getLogger(__name__)

SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = (
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
)
BOS_TOKEN = "<|bos|>"
# Written by the chat template before every "|" of message text, deleted by the tokenizer's normalizer (see above).
CHAT_ESCAPE = "\ufdd0"
# nanochat has no EOS/PAD token; <|assistant_end|> ends a reply (generation stops there) and pads in SFT/RL.
EOS_TOKEN = "<|assistant_end|>"

# nanochat's conversation format (nanochat-spec.md §3.1), with {% generation %} around exactly the tokens nanochat
# trains on (mask 1): assistant text, python tool calls with their delimiters, and <|assistant_end|>. Also accepts
# the Hugging Face tool-call format: an assistant message's tool_calls render as python parts (the "code" or
# "expression" argument; another tool as name(**arguments)), each following "tool" message as a python_output part,
# and a later assistant message continues the same nanochat turn. A turn ending in a tool call with no result yet
# is left open, which keeps renders prefix-preserving (TRL's multi-turn tool training relies on that).
CHAT_TEMPLATE = r"""
{#- nanochat conversation format; see nanochat_hf/tokenizer/bpe.py. -#}
{#- Message text is data, never control: it goes out through esc(), which writes every "|" as U+FDD0 "|", so no
    message can spell a special token (all are "<|...|>"). tokenizer.json's normalizer deletes the U+FDD0 after the
    special tokens have been matched, so the text is encoded exactly as typed (CHAT_ESCAPE in tokenizer.py). -#}
{%- macro esc(text) -%}{{- text|replace('|', '\ufdd0|') -}}{%- endmacro -%}
{%- macro text_of(content, where) -%}
    {%- if content is none -%}
    {%- elif content is string -%}{{- content -}}
    {%- elif content is mapping -%}{{- content|tojson -}}
    {%- elif content is iterable -%}
        {%- for block in content -%}
            {%- if block is mapping and block['type'] == 'text' -%}{{- block['text'] -}}
            {%- else -%}
                {{- raise_exception(where ~ ' content may only hold {"type": "text"} blocks, got '
                    ~ (block['type'] if block is mapping and 'type' in block else block|string)) -}}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}{{- content|string -}}
    {%- endif -%}
{%- endmacro -%}
{%- macro json_string_field(s, key, where) -%}
    {#- The value of "key" in a JSON object serialised as a string (OpenAI-style tool-call arguments). -#}
    {%- set st = namespace(out='', mode='', hex='', high=0, done=false) -%}
    {%- set quoted = '"' ~ key ~ '"' -%}
    {%- set at = s.find(quoted) -%}
    {%- if at >= 0 -%}
        {%- set rest = s[at + quoted|length:].lstrip() -%}
        {%- if rest.startswith(':') and rest[1:].lstrip().startswith('"') -%}
            {%- set st.mode = 'str' -%}
            {%- for ch in rest[1:].lstrip()[1:] -%}
                {%- if st.mode == 'str' -%}
                    {%- if ch == '\\' -%}{%- set st.mode = 'esc' -%}
                    {%- elif ch == '"' -%}{%- set st.done = true -%}{%- break -%}
                    {%- else -%}{%- set st.out = st.out ~ ch -%}
                    {%- endif -%}
                {%- elif st.mode == 'esc' -%}
                    {%- if ch == 'u' -%}{%- set st.mode = 'hex' -%}{%- set st.hex = '' -%}
                    {%- else -%}
                        {%- set escapes = {'n': '\n', 't': '\t', 'r': '\r', 'b': '\b', 'f': '\f'} -%}
                        {%- set st.out = st.out ~ escapes.get(ch, ch) -%}
                        {%- set st.mode = 'str' -%}
                    {%- endif -%}
                {%- else -%}
                    {%- set st.hex = st.hex ~ ch -%}
                    {%- if st.hex|length == 4 -%}
                        {%- set cp = st.hex|int(base=16) -%}
                        {%- if 55296 <= cp < 56320 -%}{%- set st.high = cp -%}
                        {%- elif 56320 <= cp < 57344 and st.high -%}
                            {%- set st.out = st.out ~ '%c' % (65536 + (st.high - 55296) * 1024 + cp - 56320) -%}
                            {%- set st.high = 0 -%}
                        {%- else -%}{%- set st.out = st.out ~ '%c' % cp -%}
                        {%- endif -%}
                        {%- set st.mode = 'str' -%}
                    {%- endif -%}
                {%- endif -%}
            {%- endfor -%}
        {%- endif -%}
    {%- endif -%}
    {%- if not st.done -%}
        {{- raise_exception(where ~ ': tool-call arguments ' ~ s ~ ' have no string field "' ~ key ~ '"') -}}
    {%- endif -%}
    {{- st.out -}}
{%- endmacro -%}
{%- macro call_code(call, where) -%}
    {#- nanochat's tool is a python calculator: a call with a "code" (or "expression") argument renders that code;
        any other named tool renders as the python call name(**arguments). -#}
    {%- set fn = call['function'] if call is mapping and 'function' in call else call -%}
    {%- set name = fn['name'] if fn is mapping and 'name' in fn else none -%}
    {%- set args = fn['arguments'] if fn is mapping and 'arguments' in fn else none -%}
    {%- set json_args = args is string and args.lstrip().startswith('{') -%}
    {%- if args is mapping and 'code' in args -%}{{- args['code'] -}}
    {%- elif args is mapping and 'expression' in args -%}{{- args['expression'] -}}
    {%- elif json_args and '"code"' in args -%}{{- json_string_field(args, 'code', where) -}}
    {%- elif json_args and '"expression"' in args -%}{{- json_string_field(args, 'expression', where) -}}
    {%- elif args is string and not json_args -%}{{- args -}}
    {%- elif name is string and name -%}
        {%- if args is mapping and args|length > 0 -%}{{- name ~ '(**' ~ args|tojson ~ ')' -}}
        {%- elif json_args and args.strip() != '{}' -%}{{- name ~ '(**' ~ args.strip() ~ ')' -}}
        {%- else -%}{{- name ~ '()' -}}
        {%- endif -%}
    {%- else -%}
        {{- raise_exception(where ~ ': a tool call needs a function name or a "code" (or "expression") argument') -}}
    {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(system=none, prev='', open=false, calls=false) -%}
{%- if messages|length > 0 and messages[0]['role'] == 'system' -%}
    {%- set ns.system = text_of(messages[0]['content'] if 'content' in messages[0] else none, 'system message') -%}
{%- endif -%}
<|bos|>
{%- for m in messages -%}
    {%- set where = 'message ' ~ loop.index0 -%}
    {%- set role = m['role'] if 'role' in m else none -%}
    {%- if loop.first and role == 'system' -%}
    {%- elif role == 'user' -%}
        {%- if ns.prev == 'user' -%}
            {{- raise_exception(where ~ ': two user messages in a row; user and assistant messages must alternate') -}}
        {%- endif -%}
        {%- if ns.open -%}
            {%- generation -%}<|assistant_end|>{%- endgeneration -%}
            {%- set ns.open = false -%}
        {%- endif -%}
        {%- set text = text_of(m['content'] if 'content' in m else none, where) -%}
        {%- if ns.system is not none -%}
            {%- set text = ns.system ~ '\n\n' ~ text -%}
            {%- set ns.system = none -%}
        {%- endif -%}
        <|user_start|>{{- esc(text) -}}<|user_end|>
    {%- elif role == 'assistant' -%}
        {%- if ns.prev == 'user' -%}
            <|assistant_start|>
            {%- set ns.open = true -%}
        {%- elif ns.prev == '' -%}
            {{- raise_exception(where ~ ': the conversation must start with a user message '
                ~ '(after an optional system message)') -}}
        {%- elif ns.prev == 'assistant' -%}
            {{- raise_exception(where ~ ': two assistant messages in a row; an assistant message follows a user '
                ~ 'message or a tool result') -}}
        {%- endif -%}
        {%- set content = m['content'] if 'content' in m else none -%}
        {%- if content is string -%}
            {%- generation -%}{{- esc(content) -}}{%- endgeneration -%}
        {%- elif content is iterable and content is not mapping -%}
            {%- for part in content -%}
                {%- set kind = part['type'] if part is mapping and 'type' in part else none -%}
                {%- if kind == 'text' -%}
                    {%- generation -%}{{- esc(part['text']) -}}{%- endgeneration -%}
                {%- elif kind == 'python' -%}
                    {%- generation -%}<|python_start|>{{- esc(part['text']) -}}<|python_end|>{%- endgeneration -%}
                {%- elif kind == 'python_output' -%}
                    <|output_start|>{{- esc(part['text']) -}}<|output_end|>
                {%- else -%}
                    {{- raise_exception(where ~ ': unknown assistant content part type ' ~ (kind|string)
                        ~ ' (expected text, python or python_output)') -}}
                {%- endif -%}
            {%- endfor -%}
        {%- elif content is not none -%}
            {{- raise_exception(where ~ ': assistant content must be a string or a list of parts') -}}
        {%- endif -%}
        {%- set calls = m['tool_calls'] if 'tool_calls' in m and m['tool_calls'] else [] -%}
        {%- for call in calls -%}
            {%- generation -%}<|python_start|>{{- esc(call_code(call, where)) -}}<|python_end|>{%- endgeneration -%}
        {%- endfor -%}
        {%- set ns.calls = calls|length > 0 -%}
    {%- elif role == 'tool' -%}
        {%- if not (ns.prev == 'tool' or (ns.prev == 'assistant' and ns.calls)) -%}
            {{- raise_exception(where ~ ': a tool message must follow an assistant message with tool_calls') -}}
        {%- endif -%}
        <|output_start|>{{- esc(text_of(m['content'] if 'content' in m else none, where)) -}}<|output_end|>
    {%- elif role == 'system' -%}
        {{- raise_exception(where ~ ': a system message is only allowed as the first message') -}}
    {%- else -%}
        {{- raise_exception(where ~ ': unknown role ' ~ (role|string)
            ~ ' (expected system, user, assistant or tool)') -}}
    {%- endif -%}
    {%- if not (loop.first and role == 'system') -%}{%- set ns.prev = role -%}{%- endif -%}
{%- endfor -%}
{%- if ns.system is not none -%}
    {{- raise_exception('a system message must be followed by a user message') -}}
{%- endif -%}
{%- set prompt = add_generation_prompt is defined and add_generation_prompt -%}
{#- A turn waiting for a tool result (or continued after one when prompting) stays open: nanochat's engine inserts
    the output and the model goes on in the same turn. -#}
{%- if ns.open and not (ns.prev == 'assistant' and ns.calls) and not (prompt and ns.prev == 'tool') -%}
    {%- generation -%}<|assistant_end|>{%- endgeneration -%}
    {%- set ns.open = false -%}
{%- endif -%}
{%- if prompt and not ns.open -%}<|assistant_start|>{%- endif -%}
""".strip()


# ---------------------------------------------------------------------------------------------------------------
# The GPT-2 byte-level alphabet


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map: printable Latin-1 bytes stand for themselves, the other
    68 bytes take the characters U+0100 upwards in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + len(mapping) - len(printable))
    return mapping


_BYTE_TO_CHAR = _byte_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}
# Training vocabulary (characters U+0000..U+00FF = bytes, see the module docstring) -> GPT-2 alphabet, in C.
_LATIN1_TO_GPT2 = str.maketrans({chr(b): c for b, c in _BYTE_TO_CHAR.items()})


def _token_bytes_of(token: str) -> bytes:
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in token)
    except KeyError as err:
        raise ValueError(f"token {token!r} has a character outside the byte-level alphabet: {err.args[0]!r}") from None


# ---------------------------------------------------------------------------------------------------------------
# Training
#
# The trainer sees each document as its UTF-8 bytes, one character per byte (U+0000..U+00FF, i.e. the bytes decoded
# as Latin-1; ASCII text is its own view). BpeTrainer numbers its initial alphabet by code point, so byte b gets id
# b, as in rustbpe. The split regex is rewritten to act on that view: every class of SPLIT_PATTERN (\p{L}, \p{N},
# \s and their complements) becomes an alternation of UTF-8 byte sequences, so the view splits at exactly the
# places where the text splits, and the whole corpus pass stays in Rust.

_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_ASCII_WS = r"\t\n\x0b\x0c\r "


@functools.lru_cache(maxsize=1)
def _non_ascii_chars() -> str:
    return "".join(map(chr, range(0x80, 0xD800))) + "".join(map(chr, range(0xE000, 0x110000)))


def _code_point_ranges(pattern: str) -> list[tuple[int, int]]:
    """Maximal ranges of non-ASCII code points (surrogates excluded) matched by a one-character `pattern`, as the
    `regex` module's Unicode tables classify them."""
    ranges = []
    for run in regex.finditer(f"(?:{pattern})+", _non_ascii_chars()):
        lo, hi = ord(run.group()[0]), ord(run.group()[-1])
        if lo < 0xD800 <= hi:  # a run through the (absent) surrogates is two ranges of code points
            ranges += [(lo, 0xD7FF), (0xE000, hi)]
        else:
            ranges.append((lo, hi))
    return ranges


def _complement(*classes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Non-ASCII code points (surrogates excluded) in none of `classes`."""
    covered = sorted(r for ranges in classes for r in ranges)
    gaps, nxt = [], 0x80
    for lo, hi in [*covered, (0x110000, 0x110000)]:
        if lo > nxt:
            gaps += [(a, b) for a, b in ((nxt, min(lo - 1, 0xD7FF)), (max(nxt, 0xE000), lo - 1)) if a <= b]
        nxt = max(nxt, hi + 1)
    return gaps


def _utf8_sequences(lo: int, hi: int) -> Iterator[tuple[tuple[int, int], ...]]:
    """Byte-range sequences whose concatenations are exactly the UTF-8 encodings of the code points lo..hi
    (the standard construction: split the range until each byte position varies over a contiguous range)."""
    for bound in (0x7F, 0x7FF, 0xFFFF):
        if lo <= bound < hi:
            yield from _utf8_sequences(lo, bound)
            yield from _utf8_sequences(bound + 1, hi)
            return
    n = len(chr(lo).encode("utf-8", "surrogatepass"))
    for i in range(1, n):
        mask = (1 << (6 * i)) - 1
        if lo & ~mask != hi & ~mask:
            if lo & mask:
                yield from _utf8_sequences(lo, lo | mask)
                yield from _utf8_sequences((lo | mask) + 1, hi)
                return
            if hi & mask != mask:
                yield from _utf8_sequences(lo, (hi & ~mask) - 1)
                yield from _utf8_sequences(hi & ~mask, hi)
                return
    first, last = chr(lo).encode("utf-8"), chr(hi).encode("utf-8")
    yield tuple(zip(first, last, strict=True))


def _byte_class(lo: int, hi: int) -> str:
    return f"\\x{{{lo:x}}}" if lo == hi else f"[\\x{{{lo:x}}}-\\x{{{hi:x}}}]"


def _alternation(sequences: list[tuple[tuple[int, int], ...]]) -> str:
    """A regex (Oniguruma syntax) over the byte view matching any of `sequences`, factored by leading byte range
    so that a character is rejected after one comparison per group."""
    groups: dict[tuple[int, int], list[tuple[tuple[int, int], ...]]] = {}
    for seq in sequences:
        groups.setdefault(seq[0], []).append(seq[1:])
    alternatives = []
    # Each character matches exactly one group, so their order is free: try the lead bytes of the most common
    # non-ASCII text first (punctuation U+2000.., Latin-1, CJK, kana, Hangul, Latin Extended, Greek, Cyrillic).
    priority = (0xE2, 0xC2, 0xC3, 0xE4, 0xE5, 0xE6, 0xE7, 0xE8, 0xE9, 0xE3, 0xEA, 0xEB, 0xEC, 0xED, 0xC4, 0xC5)
    rank = {b: i for i, b in enumerate(priority)}
    for first, rests in sorted(groups.items(), key=lambda g: (rank.get(g[0][0], len(rank)), g[0])):
        if rests == [()]:
            alternatives.append(_byte_class(*first))
        elif len(rests) == 1:
            alternatives.append(_byte_class(*first) + "".join(_byte_class(*b) for b in rests[0]))
        else:
            alternatives.append(f"{_byte_class(*first)}(?:{_alternation(rests)})")
    return "|".join(alternatives)


def _multibyte(ranges: list[tuple[int, int]]) -> str:
    """The non-ASCII code point `ranges` as a regex over the byte view."""
    sequences = [seq for lo, hi in ranges for seq in _utf8_sequences(lo, hi)]
    return _alternation(sequences) if sequences else "(?!)"


@functools.lru_cache(maxsize=1)
def _training_pattern() -> str:
    """SPLIT_PATTERN for the byte view. Each character class is its ASCII part plus, behind a lookahead on a UTF-8
    lead byte (so ASCII never pays for it), the alternation of its multi-byte characters."""
    lead = r"(?=[\x{c0}-\x{f7}])"
    letters, numbers, spaces = (_code_point_ranges(p) for p in (r"\p{L}", r"\p{N}", r"\s"))
    letter_mb, number_mb, space_mb = _multibyte(letters), _multibyte(numbers), _multibyte(spaces)
    letter = f"(?:[A-Za-z]|{lead}(?:{letter_mb}))"
    number = f"(?:[0-9]|{lead}(?:{number_mb}))"
    space = f"(?:[{_ASCII_WS}]|{lead}(?:{space_mb}))"
    # [^\r\n\p{L}\p{N}] and [^\s\p{L}\p{N}]: the ASCII complement as a class, the rest as explicit ranges.
    not_crlf_letter_number = (
        f"(?:[^\\r\\nA-Za-z0-9\\x{{80}}-\\x{{ff}}]|{lead}(?:{_multibyte(_complement(letters, numbers))}))"
    )
    other = (
        f"(?:[^{_ASCII_WS}A-Za-z0-9\\x{{80}}-\\x{{ff}}]|{lead}(?:{_multibyte(_complement(letters, numbers, spaces))}))"
    )
    # '(?i:[sdmt]|ll|ve|re): case-insensitive letters include a few non-ASCII ones (U+017F LONG S matches s).
    folding = [cp for lo, hi in _code_point_ranges("(?i:[sdmtlver])") for cp in range(lo, hi + 1)]

    def nocase(c: str) -> str:
        extra = _multibyte([(cp, cp) for cp in folding if regex.fullmatch(f"(?i:{c})", chr(cp))])
        return f"(?:[{c}{c.upper()}]|{extra})"

    ci = {ch: nocase(ch) for ch in "sdmtlver"}
    contraction = (
        f"'(?:{ci['s']}|{ci['d']}|{ci['m']}|{ci['t']}|{ci['l']}{ci['l']}|{ci['v']}{ci['e']}|{ci['r']}{ci['e']})"
    )
    return (
        f"{contraction}"
        f"|{not_crlf_letter_number}?+{letter}+"
        f"|{number}{{1,2}}"
        f"| ?{other}++[\\r\\n]*"
        f"|{space}*[\\r\\n]"
        f"|{space}+(?={space}|\\z)"  # \s+(?!\S): followed by whitespace or the end
        f"|{space}+"
    )


def _check_no_surrogates(text: str, what: str) -> None:
    match = _SURROGATE_RE.search(text)
    if match is not None:
        raise ValueError(
            f"{what} contains a lone surrogate U+{ord(match.group()):04X} at index {match.start()}; it cannot be "
            "encoded as UTF-8 — fix the input's decoding (e.g. errors='replace')"
        )


def _training_view(doc: str) -> str:
    """`doc` as the trainer sees it: its UTF-8 bytes, one character per byte."""
    if doc.isascii():
        return doc
    try:
        return doc.encode("utf-8").decode("latin-1")
    except UnicodeEncodeError:
        _check_no_surrogates(doc, "training document")
        raise


def _capped_docs(texts: Iterable[str], doc_cap: int | None, max_chars: int | None) -> Iterator[str]:
    """nanochat's tok_train text iterator: each document cut to doc_cap characters; stop after the document that
    takes the running total past max_chars."""
    total = 0
    for doc in texts:
        if not isinstance(doc, str):
            raise TypeError(f"training texts must be str, got {type(doc).__name__}")
        if doc_cap is not None and len(doc) > doc_cap:
            doc = doc[:doc_cap]
        total += len(doc)
        yield doc
        if max_chars is not None and total > max_chars:
            return


@contextlib.contextmanager
def _parallel_pass_serial_merges() -> Iterator[Callable[[], None]]:
    """Keep BpeTrainer's corpus pass parallel but run its merge loop serially.

    The merge loop hands every single merge to rayon; on a few cores that overhead exceeds the gain (50 MB of text,
    32K vocab, 2 cores: merge phase 1.2 s serial vs 2.3-2.9 s parallel; the corpus pass takes 3.4 s). `tokenizers`
    reads TOKENIZERS_PARALLELISM at each parallel section, so flipping it when the input is exhausted (the yielded
    callback) affects only what follows the pass. The variable is set before training so the flip only replaces a
    value, and it is restored afterwards. A user who disabled parallelism keeps it disabled.
    """
    name = "TOKENIZERS_PARALLELISM"
    previous = os.environ.get(name)
    disabled = previous is not None and previous.strip().lower() in ("", "off", "false", "f", "no", "n", "0")
    if disabled or (os.cpu_count() or 1) > 8:  # measured on 2 cores only: on big machines keep the library default
        yield lambda: None
        return
    os.environ[name] = "true"
    try:
        yield lambda: os.environ.__setitem__(name, "false")
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 32768,
    *,
    doc_cap: int | None = 10_000,
    max_chars: int | None = None,
    show_progress: bool = True,
    source: str = "the training texts",
) -> PreTrainedTokenizerFast:
    """Train nanochat's tokenizer on `texts` (an iterable of documents) with the `tokenizers` BPE trainer.

    Learns ``vocab_size - 9`` regular tokens (256 bytes + merges) exactly as rustbpe would on the same documents;
    the 9 special tokens take the last 9 ids. Documents are cut to `doc_cap` characters and reading stops after the
    document that takes the total past `max_chars` (nanochat's tok_train uses 10,000 and 2B; None = no limit).
    Progress bars come from the Rust trainer when `show_progress`. Texts with nothing but whitespace are refused
    (a UsageError naming `source`): they would give a tokenizer of bytes alone.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of documents, not a single string")
    n_special = len(SPECIAL_TOKENS)
    if vocab_size < 256 + n_special:
        raise ValueError(f"vocab_size must be at least {256 + n_special} (256 bytes + {n_special} special tokens)")
    for name, value in (("doc_cap", doc_cap), ("max_chars", max_chars)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be positive or None, got {value}")

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_special,
        min_frequency=0,
        show_progress=show_progress,
        special_tokens=[],
        initial_alphabet=[chr(b) for b in range(256)],
    )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(_training_pattern()), behavior="isolated")
    length = len(texts) if isinstance(texts, Sequence) else None

    with _parallel_pass_serial_merges() as input_exhausted:

        def stream() -> Iterator[str]:
            has_text = False
            for number, doc in enumerate(_capped_docs(texts, doc_cap, max_chars)):
                has_text = has_text or (doc != "" and not doc.isspace())
                try:
                    yield _training_view(doc)
                except ValueError as err:
                    raise ValueError(f"{err} (document {number} of the training texts)") from None
            if not has_text:
                raise UsageError(f"{source}: no text to train on (no documents, or only empty or whitespace ones); "
                                 "give it text to learn merges from")
            input_exhausted()

        backend.train_from_iterator(stream(), trainer, length=length)

    model = json.loads(backend.to_str())["model"]
    vocab = {token.encode("latin-1"): token_id for token, token_id in model["vocab"].items()}
    merges = [(a.encode("latin-1"), b.encode("latin-1")) for a, b in model["merges"]]
    if len(vocab) < vocab_size - n_special:
        logger.warning(
            "the training text only supports %d merges; the vocabulary has %d tokens instead of %d",
            len(merges), len(vocab) + n_special, vocab_size,
        )  # fmt: skip
    if len(merges) != len(vocab) - 256:
        # BpeTrainer reuses the id of a token string that an earlier merge already produced, where rustbpe gives the
        # duplicate a fresh id (and nanochat's tiktoken export then drops one). Not seen in any of our tests; if it
        # happens, the ids after that merge differ from rustbpe's.
        logger.warning("%d merges produced an already existing token", len(merges) - (len(vocab) - 256))
    return tokenizer_from_merges(vocab, merges)


# ---------------------------------------------------------------------------------------------------------------
# Assembling the tokenizer


def configure_pipeline(backend: Tokenizer, pattern: str = SPLIT_PATTERN) -> None:
    """Give a byte-level BPE `backend` nanochat's text pipeline: no normalizer, `pattern` split (isolated), GPT-2
    byte-level mapping without a regex or prefix space of its own, byte-level decoder."""
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()


def wrap_backend(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a configured backend that already holds nanochat's special tokens as a transformers fast tokenizer:
    BOS prepended by ``tokenizer(text)``, ``<|assistant_end|>`` as EOS and PAD, nanochat's chat template with the
    normalizer that undoes its escape of message text, and no clean-up of spaces on decode (decoding must be
    byte-exact).

    The BOS rule lives in tokenizer.json's post-processor, which is what transformers 5 saves and reloads (it
    drops an ``add_bos_token`` flag from tokenizer_config.json), so it survives save_pretrained/from_pretrained.
    """
    bos_id = backend.token_to_id(BOS_TOKEN)
    if bos_id is None:
        raise ValueError(f"the backend tokenizer has no {BOS_TOKEN} token; add nanochat's special tokens first")
    _install_chat_escape(backend)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
        model_input_names=["input_ids", "attention_mask"],
    )


def chat_escape_normalizer() -> normalizers.Replace:
    """The normalizer that undoes the chat template's escape of message text (see the module docstring)."""
    return normalizers.Replace(CHAT_ESCAPE + "|", "|")


def _install_chat_escape(backend: Tokenizer) -> None:
    escape = chat_escape_normalizer()
    if backend.normalizer is not None and backend.normalizer.__getstate__() != escape.__getstate__():
        raise ValueError(f"the tokenizer already has a normalizer ({backend.normalizer}); nanochat's has none, and "
                         "the chat template's escape needs its own")
    backend.normalizer = escape


def set_chat_template(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Give a nanochat tokenizer (in place) this package's chat template and the normalizer that goes with it. For
    tokenizers saved before the template escaped message text, whose template lets a typed ``<|user_end|>`` become
    the special token: load, call this, ``save_pretrained`` again."""
    _install_chat_escape(tokenizer.backend_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tokenizer_from_merges(vocab: dict[bytes, int], merges: Sequence[tuple[bytes, bytes]]) -> PreTrainedTokenizerFast:
    """nanochat's tokenizer from a byte-level vocabulary (token bytes -> id, ids 0..N-1) and its merges in priority
    order; the special tokens get ids N..N+8."""
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise ValueError("vocabulary ids must be the contiguous range 0..N-1")
    gpt2_vocab = {token.decode("latin-1").translate(_LATIN1_TO_GPT2): i for token, i in vocab.items()}
    gpt2_merges = [
        (a.decode("latin-1").translate(_LATIN1_TO_GPT2), b.decode("latin-1").translate(_LATIN1_TO_GPT2))
        for a, b in merges
    ]
    backend = Tokenizer(models.BPE(vocab=gpt2_vocab, merges=gpt2_merges, ignore_merges=True))
    configure_pipeline(backend)
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return wrap_backend(backend)


def load_tokenizer(path_or_repo: str, *, what: str = "--tokenizer", **kwargs) -> PreTrainedTokenizerFast:
    """``AutoTokenizer.from_pretrained`` for a folder or Hub repo saved by this package (no remote code needed).

    A local folder that is missing, or that holds no loadable tokenizer, is a UsageError naming it (`what` names
    the argument); a Hub repo id is left to huggingface_hub's own errors."""
    check_source(str(path_or_repo), what)
    if not Path(path_or_repo).expanduser().exists():
        return AutoTokenizer.from_pretrained(path_or_repo, **kwargs)
    try:
        return AutoTokenizer.from_pretrained(Path(path_or_repo).expanduser(), **kwargs)
    except Exception as err:  # whatever a bad folder makes transformers or tokenizers raise, it is the folder's fault
        raise UsageError(f"{what}: cannot load a tokenizer from {path_or_repo} ({type(err).__name__}: {err}); pass "
                         "a folder written by `nanochat-hf tokenizer train` or save_pretrained") from err


# ---------------------------------------------------------------------------------------------------------------
# Using it


def encode(tokenizer: PreTrainedTokenizerFast, text: str, *, prepend_bos: bool = False) -> list[int]:
    """Token ids of `text` the way nanochat encodes: special-token strings in the text are ordinary text, and
    ``<|bos|>`` is prepended only when asked. Raises ValueError for text that cannot be UTF-8 encoded."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    if not text.isascii():
        _check_no_surrogates(text, "text")
    ids = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    return [tokenizer.bos_token_id, *ids] if prepend_bos else ids


def token_bytes(tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """int32 tensor (len(tokenizer),): the number of raw bytes each token stands for, 0 for special tokens.

    Computed from the byte-level vocabulary strings (each character is one byte), never by decoding: a token that is
    a partial UTF-8 character (e.g. the lone byte 0x80) counts its true byte length. Used for bits per byte.
    """
    counts = [0] * len(tokenizer)
    added = tokenizer.added_tokens_decoder
    for token, token_id in tokenizer.get_vocab().items():
        if token_id in added:
            # Special tokens carry no text; a plain added token is matched as literal text.
            counts[token_id] = 0 if added[token_id].special else len(token.encode("utf-8"))
        else:
            counts[token_id] = len(_token_bytes_of(token))
    return torch.tensor(counts, dtype=torch.int32)


_TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def _files_of(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"{path}: no {'/'.join(_TEXT_SUFFIXES)} files in this folder")
        return files
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.suffix not in _TEXT_SUFFIXES:
        raise ValueError(f"{path}: unsupported file type (expected {', '.join(_TEXT_SUFFIXES)} or a folder of them)")
    return [path]


def _decode_utf8(data: bytes, path: Path, base_offset: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: not valid UTF-8 at byte offset {base_offset + err.start} ({err.reason}); convert the file to "
            "UTF-8"
        ) from None


def _iter_jsonl(path: Path, column: str) -> Iterator[str]:
    offset = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode_utf8(raw, path, offset).strip()
            offset += len(raw)
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
            if not isinstance(row, dict) or column not in row:
                found = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{path}:{lineno}: no column {column!r}; this row has {found}")
            value = row[column]
            if value is None:
                continue
            if not isinstance(value, str):
                raise ValueError(f"{path}:{lineno}: column {column!r} holds {type(value).__name__}, not text")
            yield value


def _iter_parquet(path: Path, column: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    if column not in names:
        raise ValueError(f"{path}: no column {column!r}; the file has columns {names}")
    for batch in parquet.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is None:
                continue
            if not isinstance(value, str):
                raise ValueError(f"{path}: column {column!r} holds {type(value).__name__}, not text")
            yield value


def iter_texts(paths: Sequence[str | os.PathLike] | str | os.PathLike, text_column: str = "text") -> Iterator[str]:
    """Documents from .txt files (one document per file), .jsonl and .parquet files (one per row, from
    `text_column`), or folders of those (searched recursively, sorted). Raises ValueError naming the file for a
    missing column, text that is not UTF-8 (with the byte offset) or a folder with no such files."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    # Resolve every path first so a typo in the last one fails before hours of reading the first.
    files = [f for p in paths for f in _files_of(Path(p))]
    for path in files:
        if path.suffix == ".txt":
            yield _decode_utf8(path.read_bytes(), path)
        elif path.suffix == ".jsonl":
            yield from _iter_jsonl(path, text_column)
        else:
            yield from _iter_parquet(path, text_column)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: bytes per token on a few kinds of text (nanochat's tok_eval). The samples are written for this module.

EVAL_SAMPLES: dict[str, str] = {
    "news": (
        "CITY HALL, Tuesday -- The council voted 7-2 late on Monday to extend the riverside tram line by four "
        "stops, ending a debate that has run since the spring. Supporters said the extension would cut commuting "
        "times from the eastern districts by up to twenty minutes, while opponents questioned the $48 million "
        "price tag and warned that construction would close two bridges for most of next year.\n\n"
        '"We have waited long enough," said the deputy mayor, who chaired the session. "Every month of delay '
        'costs more than the project itself." Work is expected to begin in March, and the first trams could run '
        "on the new section by late 2027, according to the transport authority's latest schedule."
    ),
    "korean": (
        "오늘 아침 서울에는 올해 들어 가장 많은 눈이 내렸다. 출근길 도로 곳곳이 얼어붙어 버스와 지하철 이용객이 크게 "
        "늘었고, 일부 학교는 수업 시작 시간을 한 시간 늦췄다. 기상청은 내일 오후까지 눈이 이어지다가 밤부터 점차 "
        '그칠 것으로 내다봤다.\n\n시민들은 대체로 차분하게 대응했다. 한 상인은 "가게 앞 눈을 치우느라 평소보다 '
        '일찍 나왔다"며 "그래도 아이들이 눈사람을 만드는 모습을 보니 기분이 좋다"고 말했다.'
    ),
    "code": (
        "from dataclasses import dataclass\n\n\n@dataclass\nclass Interval:\n    start: float\n    end: float\n\n"
        '    def overlaps(self, other: "Interval") -> bool:\n        return self.start < other.end and other.start '
        '< self.end\n\n\ndef merge(intervals: list[Interval]) -> list[Interval]:\n    """Merge overlapping '
        'intervals; the result is sorted by start."""\n    out: list[Interval] = []\n    for iv in sorted('
        "intervals, key=lambda i: i.start):\n        if out and out[-1].end >= iv.start:\n            out[-1].end "
        "= max(out[-1].end, iv.end)\n        else:\n            out.append(Interval(iv.start, iv.end))\n    return "
        'out\n\n\nif __name__ == "__main__":\n    print(merge([Interval(1, 3), Interval(2, 6), Interval(8, 10)]))\n'
    ),
    "math": (
        "Let $f(x) = x^3 - 3x + 1$. Then $f'(x) = 3x^2 - 3$, which vanishes at $x = \\pm 1$. Since "
        "$f''(x) = 6x$, the point $x = -1$ is a local maximum with $f(-1) = 3$ and $x = 1$ is a local minimum with "
        "$f(1) = -1$. By the intermediate value theorem $f$ has a root in each of $(-2, -1)$, $(0, 1)$ and "
        "$(1, 2)$.\n\n\\begin{align}\n\\int_0^1 x^2 e^{x}\\,dx &= \\left[x^2 e^x\\right]_0^1 - 2\\int_0^1 x e^x\\,dx"
        " \\\\\n&= e - 2\\left(\\left[x e^x\\right]_0^1 - \\int_0^1 e^x\\,dx\\right) = e - 2.\n\\end{align}\n"
        "Check: $e - 2 \\approx 0.71828$, and $0 \\le x^2 e^x \\le e$ on $[0,1]$, so $0 < 0.718 < 2.719$."
    ),
    "science": (
        "Photosynthesis converts light energy into chemical energy stored in sugars. In the light-dependent "
        "reactions, which take place in the thylakoid membranes of the chloroplast, photosystem II splits water "
        "molecules, releasing O2 and passing electrons along a transport chain that pumps protons into the "
        "thylakoid lumen. The resulting proton gradient drives ATP synthase, while photosystem I re-energises the "
        "electrons to reduce NADP+ to NADPH.\n\nThe Calvin cycle, in the stroma, then uses ATP and NADPH to fix "
        "CO2: the enzyme RuBisCO attaches CO2 to ribulose-1,5-bisphosphate, and the product is reduced to "
        "glyceraldehyde-3-phosphate (G3P). Roughly 6 CO2 + 6 H2O -> C6H12O6 + 6 O2 summarises the overall "
        "process, although the real pathway involves dozens of intermediate steps."
    ),
}


def compression_stats(tokenizer: PreTrainedTokenizerFast, samples: dict[str, str] | None = None) -> dict[str, dict]:
    """Per text kind: UTF-8 bytes, characters, tokens (no BOS) and bytes per token -- higher is better compression.
    Defaults to :data:`EVAL_SAMPLES`."""
    stats = {}
    for kind, text in (EVAL_SAMPLES if samples is None else samples).items():
        n_bytes = len(text.encode("utf-8"))
        n_tokens = len(encode(tokenizer, text))
        stats[kind] = {
            "bytes": n_bytes,
            "chars": len(text),
            "tokens": n_tokens,
            "bytes_per_token": n_bytes / n_tokens if n_tokens else 0.0,
        }
    return stats
