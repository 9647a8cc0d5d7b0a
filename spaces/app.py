"""Chat with a nanochat model: a Gradio ChatInterface that streams its replies, with nanochat's abuse limits.

On a Space this file runs from its own folder: the model comes from the Hub by repo id (`space_config.json`, written
by `nanochat-hf push --space`) and loads with `trust_remote_code=True`; the generation engine is the vendored package
`nanochat_engine`. Locally, `nanochat-hf serve --model DIR` runs the same folder.

What a visitor sends is data: special-token strings in messages stay text (the tokenizer's chat template sees to
that), a history longer than the token limit could hold is refused by its size before it is tokenised, and sampling
settings that are not finite numbers in range are refused with a gradio error naming them.

Settings: `--model` or NANOCHAT_MODEL; limits by flag or NANOCHAT_MAX_MESSAGE_CHARS, NANOCHAT_MAX_TURNS,
NANOCHAT_MAX_TOTAL_TOKENS, NANOCHAT_CONCURRENCY, NANOCHAT_QUEUE_SIZE.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

try:
    from nanochat_engine.engine import Engine, replace_invalid_utf8  # vendored into the Space by `nanochat-hf push`
except ImportError:  # spaces/app.py run from a checkout with nanochat-hf installed
    from nanochat_hf.inference.engine import Engine, replace_invalid_utf8

HERE = Path(__file__).resolve().parent
# Replies that are limit notices start with this; they are left out of the conversation the model sees.
NOTICE = "⚠️ "


@dataclass(frozen=True)
class Limits:
    # nanochat's web server allowed 8,000 characters per message; a Space also caps turns and tokens
    max_message_chars: int = 8000
    max_turns: int = 32
    max_total_tokens: int | None = None  # prompt + reply; None = the model's context length
    concurrency: int = 1  # generations at once; more requests wait in the queue
    queue_size: int = 32


def _env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else default


def default_limits() -> Limits:
    base = Limits()
    return Limits(
        max_message_chars=_env_int("NANOCHAT_MAX_MESSAGE_CHARS", base.max_message_chars),
        max_turns=_env_int("NANOCHAT_MAX_TURNS", base.max_turns),
        max_total_tokens=_env_int("NANOCHAT_MAX_TOTAL_TOKENS", base.max_total_tokens),
        concurrency=_env_int("NANOCHAT_CONCURRENCY", base.concurrency),
        queue_size=_env_int("NANOCHAT_QUEUE_SIZE", base.queue_size),
    )


def resolve_model(model: str | None) -> str:
    if model:
        return model
    if os.environ.get("NANOCHAT_MODEL"):
        return os.environ["NANOCHAT_MODEL"]
    config = HERE / "space_config.json"
    if config.is_file():
        return json.loads(config.read_text())["model"]
    raise SystemExit("no model: pass --model DIR_OR_REPO_ID or set NANOCHAT_MODEL")


def load_engine(model_id: str) -> Engine:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=True, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)
    return Engine(model, tokenizer)


def flatten(content) -> str:
    """Gradio 6 hands history content as a list of blocks ({"type": "text", "text": ...}); the template wants text."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(flatten(part) for part in content)
    return ""


def history_to_messages(history: list[dict]) -> list[dict]:
    messages: list[dict] = []
    for entry in history:
        role, text = entry.get("role"), replace_invalid_utf8(flatten(entry.get("content")))
        if role not in ("user", "assistant"):
            continue
        if role == "assistant" and text.startswith(NOTICE):
            if messages and messages[-1]["role"] == "user":
                messages.pop()  # the request that was refused never reached the model
            continue
        if role == "assistant" and messages and messages[-1]["role"] == "assistant":
            messages[-1]["content"] += text  # one reply split over several chat bubbles
        else:
            messages.append({"role": role, "content": text})
    return messages


def _number(name: str, value, low: float, high: float = math.inf, whole: bool = False) -> float:
    """`value` if it is a number in [low, high] (a whole one if `whole`), else a gr.Error naming the setting: the
    sliders cannot send NaN, infinities or text, but a client of the API can."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (is_number and math.isfinite(value) and low <= value <= high and (not whole or value == int(value))):
        kind = "a whole number" if whole else "a number"
        bound = f">= {low:g}" if high == math.inf else f"from {low:g} to {high:g}"
        raise gr.Error(f"{name} must be {kind} {bound}, got {value!r}")
    return value


def check_sampling(temperature, top_k, max_tokens) -> tuple[float, int | None, int]:
    """The sampling settings as the engine takes them (top_k 0 = off); gr.Error for anything else."""
    temperature = float(_number("temperature", temperature, 0.0, 2.0))
    top_k = int(_number("top_k", top_k, 0, whole=True))
    max_tokens = int(_number("max_tokens", max_tokens, 1, whole=True))
    return temperature, top_k or None, max_tokens


def _prompt_length(tokenizer, messages: list[dict]) -> int:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return len(ids)


class Chat:
    """The ChatInterface callback `respond`: checks the limits, then streams the engine's reply."""

    def __init__(self, engine: Engine, limits: Limits):
        self.engine, self.limits = engine, limits
        context = engine.model.config.max_position_embeddings
        self.max_total_tokens = min(limits.max_total_tokens or context, context)
        # No token is longer than the longest vocabulary entry (byte-level: one character per byte), so a
        # conversation with more characters than this cannot fit; it is refused without being tokenised.
        longest_token = max(len(token) for token in engine.tokenizer.get_vocab())
        self.max_total_chars = self.max_total_tokens * longest_token

    def refuse(self, message: str, history: list[dict]) -> tuple[str | None, list[dict], int]:
        """A notice when a limit is hit, else the conversation to send and how many tokens the reply may use."""
        limits = self.limits
        message = replace_invalid_utf8(message)
        if not message.strip():
            return NOTICE + "Please type a message.", [], 0
        if len(message) > limits.max_message_chars:
            return (NOTICE + f"Your message is {len(message):,} characters long; the limit is "
                    f"{limits.max_message_chars:,}. Please shorten it.", [], 0)
        messages = history_to_messages(history)
        chars = len(message) + sum(len(m["content"]) for m in messages)
        if chars > self.max_total_chars:
            return (NOTICE + f"This conversation is {chars:,} characters long, more than {self.max_total_tokens:,} "
                    "tokens can hold. Clear it to start a new one.", [], 0)
        turns = sum(m["role"] == "user" for m in messages)
        if turns >= limits.max_turns:
            return (NOTICE + f"This conversation has reached the limit of {limits.max_turns} turns. Clear it "
                    "(the trash icon above the chat) to start a new one.", [], 0)
        messages.append({"role": "user", "content": message})
        used = _prompt_length(self.engine.tokenizer, messages)
        room = self.max_total_tokens - used
        if room < 1:
            return (NOTICE + f"This conversation is {used:,} tokens long; the limit is {self.max_total_tokens:,} "
                    "tokens including the reply. Clear it to start a new one.", [], 0)
        return None, messages, room

    def respond(self, message: str, history: list[dict], temperature: float, top_k: float,
                max_tokens: float) -> Iterator[str]:
        """A generator method: gradio streams what a generator function yields (the cumulative reply)."""
        temperature, top_k, max_tokens = check_sampling(temperature, top_k, max_tokens)
        notice, messages, room = self.refuse(message, history)
        if notice is not None:
            yield notice
            return
        reply = ""
        for delta in self.engine.stream_chat(
            messages,
            max_tokens=min(max_tokens, room),  # the reply stops at the conversation's token limit
            temperature=temperature,
            top_k=top_k,
            seed=random.randrange(2**31),  # nanochat's server drew a fresh seed per request
        ):
            reply += delta
            yield reply
        if not reply:
            yield "(the model ended its reply without text)"


def build_demo(engine: Engine, limits: Limits, title: str) -> gr.ChatInterface:
    chat = Chat(engine, limits)
    max_reply = min(4096, chat.max_total_tokens)
    return gr.ChatInterface(
        chat.respond,
        api_name="chat",
        title=title,
        description=f"Up to {limits.max_turns} turns, {limits.max_message_chars:,} characters per message and "
        f"{chat.max_total_tokens:,} tokens per conversation.",
        additional_inputs=[
            gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="Temperature"),
            gr.Slider(0, 200, value=50, step=1, label="Top-k (0 = off)"),
            gr.Slider(1, max_reply, value=min(512, max_reply), step=1, label="Max new tokens"),
        ],
        additional_inputs_accordion=gr.Accordion("Sampling", open=False),
        fill_height=True,
    )


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    base = default_limits()
    parser = argparse.ArgumentParser(prog=prog, description="Chat with a nanochat model in the browser: a Gradio app "
                                     "that streams replies, with limits on message length, turns and tokens.")
    parser.add_argument("--model", help="model folder or Hub repo id (default: NANOCHAT_MODEL or space_config.json)")
    parser.add_argument("--host", default=None, help="address to bind (default: GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--max-message-chars", type=int, default=base.max_message_chars)
    parser.add_argument("--max-turns", type=int, default=base.max_turns)
    parser.add_argument("--max-total-tokens", type=int, default=base.max_total_tokens,
                        help="prompt + reply tokens per conversation (default: the model's context)")
    parser.add_argument("--concurrency", type=int, default=base.concurrency, help="generations at once")
    parser.add_argument("--queue-size", type=int, default=base.queue_size, help="requests waiting at most")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    args = build_parser(prog).parse_args(argv)
    for flag in ("max_message_chars", "max_turns", "concurrency", "queue_size"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1")
    limits = Limits(args.max_message_chars, args.max_turns, args.max_total_tokens, args.concurrency, args.queue_size)
    model_id = resolve_model(args.model)
    demo = build_demo(load_engine(model_id), limits, title=f"nanochat: {Path(model_id).name}")
    demo.queue(default_concurrency_limit=limits.concurrency, max_size=limits.queue_size)
    demo.launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
