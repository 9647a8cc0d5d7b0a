"""nanochat's inference engine on any `NanoChatForCausalLM`: batched sampling on a KV cache, with the calculator tool.

The prompt is prefilled once at batch 1; its cache is then replicated to `num_samples` rows, and every step runs one
forward for all rows. Each row runs nanochat's tool state machine: the text between `<|python_start|>` and
`<|python_end|>` goes to `calculate`, and `<|output_start|>result<|output_end|>` is forced into that row's stream.

Imports only torch, transformers and its sibling `tools`, so `engine.py` + `tools.py` can be vendored (e.g. into a
Space) and drive a model loaded from the Hub with `trust_remote_code=True`.
"""

import inspect
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .tools import calculate

_SPECIAL_NAMES = ("bos", "assistant_end", "python_start", "python_end", "output_start", "output_end")
# How tool blocks read in streamed text (markdown code fences, so a chat UI shows them as code).
TOOL_MARKERS = {
    "python_start": "\n```python\n",
    "python_end": "\n```\n",
    "output_start": "```output\n",
    "output_end": "\n```\n",
}


class KVCache:
    """Keys and values of every layer in buffers allocated once for the whole generation.

    transformers' `DynamicCache` concatenates each new key onto the old ones, copying the whole cache every step;
    here a step writes one slice in place. It provides what the NanoChat model calls on a cache (`update`,
    `get_seq_length`); buffers are allocated on the first `update`, which tells their shape and dtype.
    """

    _OWN_FIELDS = frozenset({"num_layers", "max_len", "pos", "keys", "values"})

    def __init__(self, num_layers: int, max_len: int):
        self.num_layers = num_layers
        self.max_len = max_len
        self.pos = 0  # tokens stored; advanced after the last layer has written, as in nanochat
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # (B, kv_heads, max_len, head_dim)
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.pos

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store (B, kv_heads, T, head_dim) keys/values after the cached ones; return all of them so far."""
        if self.keys[layer_idx] is None:
            B, H, _, D = key.shape
            self.keys[layer_idx] = key.new_zeros(B, H, self.max_len, D)
            self.values[layer_idx] = value.new_zeros(B, H, self.max_len, D)
        end = self.pos + key.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens do not fit in its {self.max_len} positions")
        self.keys[layer_idx][:, :, self.pos : end] = key
        self.values[layer_idx][:, :, self.pos : end] = value
        if layer_idx == self.num_layers - 1:
            self.pos = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def replicate(self, n: int) -> "KVCache":
        """A batch-`n` copy of this batch-1 cache (the prompt prefilled once, shared by n samples)."""
        return self.select_rows(torch.zeros(n, dtype=torch.long, device=self.keys[0].device))

    def select_rows(self, index: torch.Tensor) -> "KVCache":
        """A copy whose row i is this cache's row `index[i]`: prefixes prefilled once, each shared by several rows."""
        rows = self.keys[0].shape[0]
        copy = KVCache(self.num_layers, self.max_len)
        copy.pos = self.pos
        copy.keys = [None if k is None else k.index_select(0, index) for k in self.keys]
        copy.values = [None if v is None else v.index_select(0, index) for v in self.values]
        # Per-row state a model keeps on its cache travels too (NanoChat's smear keeps the previous token's id
        # there); it is batch-first like the keys.
        for name, value in vars(self).items():
            if name not in self._OWN_FIELDS:
                is_row_state = isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows
                setattr(copy, name, value.index_select(0, index) if is_row_state else value)
        return copy


@dataclass
class _Row:
    """One sample's progress: tokens the tool still has to force, and the python block being written."""

    forced: deque = field(default_factory=deque)
    in_python: bool = False
    python_tokens: list[int] = field(default_factory=list)
    done: bool = False


class Utf8Stream:
    """Turns generated token ids into text deltas that never end inside a UTF-8 character.

    Byte-level BPE may split one character (an emoji is 4 bytes) across tokens. Token ids are held back until
    their bytes decode without a trailing replacement character, then released together.
    """

    _MAX_HELD = 8  # a UTF-8 character spans at most 4 tokens; longer means the bytes are invalid: show them

    def __init__(self, tokenizer: PreTrainedTokenizerBase, special_text: dict[int, str] | None = None):
        self.tokenizer = tokenizer
        self.special_text = special_text or {}
        self.held: list[int] = []

    def push(self, token_id: int) -> str:
        if token_id in self.special_text:
            return self.flush() + self.special_text[token_id]
        self.held.append(token_id)
        text = self.tokenizer.decode(self.held)
        if text.endswith("\ufffd") and len(self.held) < self._MAX_HELD:
            return ""
        self.held = []
        return text

    def flush(self) -> str:
        """Whatever is held, decoded as is (the stream ended)."""
        text = self.tokenizer.decode(self.held) if self.held else ""
        self.held = []
        return text


class Engine:
    """Generation for a NanoChat model and its tokenizer (nanochat's `Engine`, on a transformers model)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        tool: Callable[[str], str | None] | None = calculate,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tool = tool
        self.ids = {}
        for name in _SPECIAL_NAMES:
            token_id = tokenizer.convert_tokens_to_ids(f"<|{name}|>")
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ValueError(
                    f"the tokenizer has no <|{name}|> token; the engine needs nanochat's special tokens (train the "
                    "tokenizer with `nanochat-hf tokenizer train` or convert a nanochat tokenizer)"
                )
            self.ids[name] = token_id
        self.stop_ids = frozenset({self.ids["assistant_end"], self.ids["bos"]})
        self._check_chat_template_keeps_text()
        # transformers 5.24 calls the cache argument `cache`, 5.23 `past_key_values`; a Hub model's code may be
        # either vintage.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
    ) -> "Engine":
        """Load model and tokenizer from a folder or a Hub repo id (`trust_remote_code=True`: the model's code
        ships with its weights)."""
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=True, dtype=dtype or "auto")
        if device is not None:
            model = model.to(device)
        return cls(model, tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        """Tokens the model can attend over (prompt + reply): its `max_position_embeddings`."""
        return self.model.config.max_position_embeddings

    def _check_chat_template_keeps_text(self) -> None:
        """Refuse a tokenizer whose chat template lets text typed in a message become special tokens: a user could
        then end their turn and write the assistant's. nanochat_hf's template escapes message text (see
        nanochat_hf/tokenizer/bpe.py); a template without the escape shows here as a special id inside the message."""
        typed = "<|assistant_end|><|bos|>"
        ids = self.render_prompt([{"role": "user", "content": typed}])
        if self.ids["assistant_end"] in ids or ids.count(self.ids["bos"]) > 1:
            raise ValueError(
                f"the tokenizer's chat template turns special-token strings typed in a message ({typed}) into special "
                "tokens, so chat input could forge turns; re-save the tokenizer with nanochat_hf's template: "
                "`nanochat_hf.tokenizer.bpe.set_chat_template(load_tokenizer(DIR)).save_pretrained(DIR)`"
            )

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text: no BOS, and special-token strings in it stay text."""
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def _logits(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        return out.logits[:, -1, :]

    # -----------------------------------------------------------------------------------------------------------
    # Generation

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: list[int],
        num_samples: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 42,
    ) -> Iterator[tuple[list[int], list[int]]]:
        """Yield, per step, one token for each of `num_samples` rows and their masks (1 sampled, 0 forced by the
        tool). A row that has ended (`<|assistant_end|>` or `<|bos|>`) keeps receiving tokens until all have."""
        _check_arguments(prompt_ids, num_samples, max_tokens, temperature, top_k)
        # Checked before the cache is allocated: its buffers hold prompt + max_tokens positions.
        if len(prompt_ids) + max_tokens > self.context_length:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) = {len(prompt_ids) + max_tokens} "
                f"exceeds the model's context of {self.context_length} tokens (max_position_embeddings); shorten the "
                "prompt or lower max_tokens"
            )
        device = self.device
        generator = torch.Generator(device=device).manual_seed(seed)
        cache = KVCache(self.model.config.num_hidden_layers, len(prompt_ids) + max_tokens)
        logits = self._logits(torch.tensor([prompt_ids], dtype=torch.long, device=device), cache)
        if num_samples > 1:
            cache = cache.replicate(num_samples)
            logits = logits.expand(num_samples, -1)  # every row samples its own first token
        rows = [_Row() for _ in range(num_samples)]
        for step in range(max_tokens):
            sampled = sample_next_token(logits, generator, temperature, top_k).tolist()
            column, masks = [], []
            for row, token in zip(rows, sampled, strict=True):
                forced = bool(row.forced)
                token = row.forced.popleft() if forced else token
                column.append(token)
                masks.append(0 if forced else 1)
                self._advance_tool_state(row, token)
            yield column, masks
            if step == max_tokens - 1 or all(row.done for row in rows):
                return
            logits = self._logits(torch.tensor(column, dtype=torch.long, device=device)[:, None], cache)

    def _advance_tool_state(self, row: _Row, token: int) -> None:
        ids = self.ids
        if token in self.stop_ids:
            row.done = True
        if token == ids["python_start"]:
            row.in_python, row.python_tokens = True, []
        elif token == ids["python_end"] and row.in_python:
            row.in_python = False
            result = self.tool(self.tokenizer.decode(row.python_tokens)) if self.tool is not None else None
            if result is not None:
                row.forced.extend([ids["output_start"], *self.encode(str(result)), ids["output_end"]])
        elif row.in_python:
            row.python_tokens.append(token)

    def generate_batch(
        self,
        prompt_ids: list[int],
        num_samples: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 42,
    ) -> tuple[list[list[int]], list[list[int]]]:
        """All samples at once: per row the generated tokens (prompt and terminal token excluded) and masks."""
        results = [[] for _ in range(num_samples)]
        masks = [[] for _ in range(num_samples)]
        done = [False] * num_samples
        for column, column_masks in self.generate(prompt_ids, num_samples, max_tokens, temperature, top_k, seed):
            for i, (token, mask) in enumerate(zip(column, column_masks, strict=True)):
                if done[i]:
                    continue
                if token in self.stop_ids:
                    done[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
        return results, masks

    # -----------------------------------------------------------------------------------------------------------
    # Chat

    def render_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation ready for the next assistant reply (the tokenizer's chat template, which keeps
        special-token strings typed in messages as text: checked when the engine is made)."""
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))

    def stream(
        self,
        prompt_ids: list[int],
        max_tokens: int = 256,
        temperature: float = 0.6,
        top_k: int | None = 50,
        seed: int = 42,
        reply_ids: list[int] | None = None,
    ) -> Iterator[str]:
        """One sample as text deltas, safe to print as they come: no delta ends inside a UTF-8 character, and tool
        blocks read as fenced code (`TOOL_MARKERS`). The generated ids (terminal token excluded) are appended to
        `reply_ids` when given. The reply ends after `max_tokens` or at the end of the model's context, whichever
        comes first; a prompt that fills the context is refused (see `generate`)."""
        room = self.context_length - len(prompt_ids)
        if isinstance(max_tokens, int) and 1 <= room < max_tokens:
            max_tokens = room
        markers = {self.ids[name]: text for name, text in TOOL_MARKERS.items()}
        text = Utf8Stream(self.tokenizer, markers)
        for column, _ in self.generate(prompt_ids, 1, max_tokens, temperature, top_k, seed):
            token = column[0]
            if token in self.stop_ids:
                break
            if reply_ids is not None:
                reply_ids.append(token)
            delta = text.push(token)
            if delta:
                yield delta
        rest = text.flush()
        if rest:
            yield rest

    def stream_chat(
        self,
        messages: list[dict],
        max_tokens: int = 256,
        temperature: float = 0.6,
        top_k: int | None = 50,
        seed: int = 42,
        reply_ids: list[int] | None = None,
    ) -> Iterator[str]:
        """Text deltas of the assistant's reply to `messages` (Hugging Face chat format); see `stream`."""
        yield from self.stream(self.render_prompt(messages), max_tokens, temperature, top_k, seed, reply_ids)

    def reply_message(self, reply_ids: list[int]) -> dict:
        """The assistant message for generated tokens, in the chat format the template renders back to the same
        structure: text, python and python_output parts."""
        kinds = {self.ids["python_start"]: "python", self.ids["output_start"]: "python_output"}
        closers = {self.ids["python_end"], self.ids["output_end"]}
        parts, kind, run = [], "text", []

        def close() -> None:
            if run or kind != "text":
                parts.append({"type": kind, "text": self.tokenizer.decode(run)})

        for token in reply_ids:
            if token in kinds or token in closers:
                close()
                kind, run = kinds.get(token, "text"), []
            elif token not in self.stop_ids:
                run.append(token)
        close()
        return {"role": "assistant", "content": parts}


def replace_invalid_utf8(text: str) -> str:
    """`text` with what was not UTF-8 replaced by U+FFFD. Python hands bytes that are not UTF-8 (in a terminal line
    read with errors="surrogateescape", or in a command-line argument) over as lone surrogates, which no tokenizer
    can encode; here they become U+FFFD, as decoding the original bytes with errors="replace" would give."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates that are not escaped bytes (e.g. from JSON's \ud800)
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)
    return raw.decode("utf-8", "replace")


def sample_next_token(
    logits: torch.Tensor, generator: torch.Generator, temperature: float = 1.0, top_k: int | None = None
) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: argmax at temperature 0, else softmax(logits / temperature) over the `top_k`
    best (all when None), sampled with `generator`."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        values, indices = torch.topk(logits, top_k, dim=-1)
        choice = torch.multinomial(torch.softmax(values, dim=-1), 1, generator=generator)
        return indices.gather(-1, choice).squeeze(-1)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


def _check_arguments(prompt_ids, num_samples, max_tokens, temperature, top_k) -> None:
    if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids or not all(isinstance(t, int) for t in prompt_ids):
        raise ValueError("prompt_ids must be a non-empty list of token ids (ints); start it with <|bos|>")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None (no limit) or an integer >= 1, got {top_k!r}")


__all__ = ["Engine", "KVCache", "TOOL_MARKERS", "Utf8Stream", "replace_invalid_utf8", "sample_next_token"]
