"""Chat with a nanochat model: a Gradio ChatInterface that streams its replies, with nanochat's abuse limits.

On a Space this file runs from its own folder: the model comes from the Hub by repo id (`space_config.json`, written
by `nanochat-hf push --space`) and loads with `trust_remote_code=True`; the generation engine is the vendored package
`nanochat_engine`. Locally, `nanochat-hf serve --model DIR` runs the same folder.

Calculator calls show as collapsible blocks titled with the tool ("calculator" or "python") and the expression, the
result inside; the next prompt renders them back as the tool tokens the model wrote. When a conversation outgrows
the model's context (or the turn limit), its oldest turns are left out of the prompt and a notice titled "Earlier
turns dropped" says so, so a long chat goes on instead of ending.

What a visitor sends is data: special-token strings in messages stay text (the tokenizer's chat template sees to
that), a history with a message longer than the token limit could hold is refused by its size before it is
tokenised, and sampling settings that are not finite numbers in range are refused with a gradio error naming them.

Settings: `--model` or NANOCHAT_MODEL; limits by flag or NANOCHAT_MAX_MESSAGE_CHARS, NANOCHAT_MAX_TURNS,
NANOCHAT_MAX_TOTAL_TOKENS, NANOCHAT_CONCURRENCY, NANOCHAT_QUEUE_SIZE.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
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
# The title of the notice that the oldest turns were left out of the prompt (also left out of it).
TRIMMED = "Earlier turns dropped"
# Tool blocks: the title names the tool and the expression; a call the tool did not answer has this log.
TOOL_LABELS = ("calculator", "python")
NO_RESULT = "no result"
ORPHAN_OUTPUT = "tool output"  # an <|output_start|> the model wrote without a call before it
# What the calculator's arithmetic route accepts (nanochat drops commas first); anything else is its string route.
_ARITHMETIC = frozenset("0123456789*+-/.() ,")
EXAMPLES = ("What is 12*34?", "How many r are in strawberry?", "Why is the sky blue?")


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


def code_span(text: str) -> str:
    """`text` as inline markdown code (so `2*3*4` does not turn italic), exactly recoverable by `from_code_span`: the
    fence is longer than any run of backticks inside, and CommonMark strips the one space padding each side."""
    longest = max((len(run) for run in re.findall("`+", text)), default=0)
    fence = "`" * (longest + 1)
    return f"{fence} {text} {fence}"


def from_code_span(span: str) -> str:
    """The text `code_span` wrapped; anything else (a client's own history) as it is."""
    fence = "`" * (len(span) - len(span.lstrip("`")))
    if fence and len(span) >= 2 * len(fence) + 2 and span.startswith(fence + " ") and span.endswith(" " + fence):
        return span[len(fence) + 1 : len(span) - len(fence) - 1]
    return span


def tool_message(expression: str | None, result: str | None, pending: bool = False) -> gr.ChatMessage:
    """A collapsible block for one tool call: titled with the tool and the expression, its result inside."""
    if expression is None:
        title = ORPHAN_OUTPUT
    else:
        label = "calculator" if set(expression) <= _ARITHMETIC else "python"
        title = f"{label}: {code_span(expression)}"
    if pending:  # no content until done: gradio would open a pending block that has some, and leave it open
        return gr.ChatMessage(role="assistant", content="", metadata={"title": title, "status": "pending"})
    metadata = {"title": title, "status": "done"}
    if result is None:
        metadata["log"] = NO_RESULT
    return gr.ChatMessage(role="assistant", content="" if result is None else code_span(result), metadata=metadata)


def reply_messages(parts: list[dict], done: bool) -> list[gr.ChatMessage]:
    """The chat bubbles for a reply's parts (`Engine.reply_message`: text, python, python_output): text as text,
    each call with its output as one tool block. Until `done`, a call at the end is still running."""
    shown: list[gr.ChatMessage] = []
    i = 0
    while i < len(parts):
        kind, text = parts[i]["type"], parts[i]["text"]
        if kind == "text":
            if text.strip():
                shown.append(gr.ChatMessage(role="assistant", content=text))
        elif kind == "python":
            answered = i + 1 < len(parts) and parts[i + 1]["type"] == "python_output"
            result = parts[i + 1]["text"] if answered else None
            i += answered
            shown.append(tool_message(text, result, pending=not done and i == len(parts) - 1))
        else:
            shown.append(tool_message(None, text, pending=not done and i == len(parts) - 1))
        i += 1
    return shown


def _tool_parts(metadata: dict, text: str) -> list[dict] | None:
    """The reply parts a tool block stands for (None if it is not one), as the model wrote and was given them."""
    title = metadata.get("title") or ""
    if title == ORPHAN_OUTPUT:
        return [{"type": "python_output", "text": from_code_span(text)}]
    label, colon, expression = title.partition(": ")
    if not colon or label not in TOOL_LABELS:
        return None
    parts = [{"type": "python", "text": from_code_span(expression)}]
    if metadata.get("status") == "done" and metadata.get("log") != NO_RESULT:
        parts.append({"type": "python_output", "text": from_code_span(text)})
    return parts


def history_to_messages(history: list[dict]) -> list[dict]:
    """The conversation the model sees, from gradio's history: notices left out, tool blocks back as python and
    python_output parts, the bubbles of one reply joined into one message."""
    messages: list[dict] = []
    for entry in history:
        role, text = entry.get("role"), replace_invalid_utf8(flatten(entry.get("content")))
        metadata = entry.get("metadata") if isinstance(entry.get("metadata"), dict) else {}
        if role == "user":
            if messages and messages[-1]["role"] == "user":
                messages.pop()  # stopped before its reply began; the template wants turns to alternate
            messages.append({"role": "user", "content": text})
            continue
        if role != "assistant" or metadata.get("title") == TRIMMED:
            continue
        if text.startswith(NOTICE):
            if messages and messages[-1]["role"] == "user":
                messages.pop()  # the request that was refused never reached the model
            continue
        if not messages:
            continue  # a reply to nothing: the template wants a user message first
        if messages[-1]["role"] == "user":
            messages.append({"role": "assistant", "content": []})
        messages[-1]["content"].extend(_tool_parts(metadata, text) or [{"type": "text", "text": text}])
    for message in messages:
        if message["role"] == "assistant" and all(part["type"] == "text" for part in message["content"]):
            message["content"] = "".join(part["text"] for part in message["content"])
    return messages


def _chars(message: dict) -> int:
    content = message["content"]
    return len(content) if isinstance(content, str) else sum(len(part["text"]) for part in content)


def _split_turns(messages: list[dict]) -> list[list[dict]]:
    """Turns: a user message and the reply after it."""
    turns: list[list[dict]] = []
    for message in messages:
        if message["role"] == "user" or not turns:
            turns.append([])
        turns[-1].append(message)
    return turns


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


class Refused(Exception):
    """A message the chat does not send to the model; its text is shown instead of a reply."""


@dataclass
class Fitted:
    """What goes to the model for one message."""

    messages: list[dict]  # the newest turns that fit, then the new message
    room: int  # tokens left in the conversation for the reply
    dropped: int  # turns of the history left out, oldest first


class Chat:
    """The ChatInterface callback `respond`: fits the conversation to the limits, then streams the engine's reply."""

    def __init__(self, engine: Engine, limits: Limits):
        self.engine, self.limits = engine, limits
        context = engine.model.config.max_position_embeddings
        self.max_total_tokens = min(limits.max_total_tokens or context, context)
        # No token is longer than the longest vocabulary entry (byte-level: one character per byte), so a
        # conversation with more characters than this cannot fit: turns are dropped by size before tokenising.
        longest_token = max(len(token) for token in engine.tokenizer.get_vocab())
        self.max_total_chars = self.max_total_tokens * longest_token

    def fit(self, message: str, history: list[dict], max_tokens: int) -> Fitted:
        """The newest turns of `history` that fit with `message` and a reply of `max_tokens` (at most half the token
        limit), oldest dropped first: by the turn limit, then by size, then by tokens. Refused: an empty or
        oversized message, a history message no reply of this chat could be, a message alone over the limit."""
        limits, total = self.limits, self.max_total_tokens
        message = replace_invalid_utf8(message)
        if not message.strip():
            raise Refused("Please type a message.")
        if len(message) > limits.max_message_chars:
            raise Refused(f"Your message is {len(message):,} characters long; the limit is "
                          f"{limits.max_message_chars:,}. Please shorten it.")
        messages = history_to_messages(history)
        longest = max((_chars(m) for m in messages), default=0)
        if longest > self.max_total_chars:  # only a client of the API can send one
            raise Refused(f"This conversation has a message {longest:,} characters long, more than {total:,} tokens "
                          "can hold. Clear it to start a new one.")
        turns = _split_turns(messages)
        kept = turns[max(0, len(turns) - (limits.max_turns - 1)):]
        chars = len(message) + sum(_chars(m) for turn in kept for m in turn)
        while kept and chars > self.max_total_chars:
            chars -= sum(_chars(m) for m in kept.pop(0))
        budget = min(max_tokens, total // 2)  # a long reply must not leave the model nothing to read
        while True:
            prompt = [m for turn in kept for m in turn] + [{"role": "user", "content": message}]
            used = len(self.engine.render_prompt(prompt))
            if used + budget <= total or not kept:
                break
            kept.pop(0)
        if used >= total:
            raise Refused(f"Your message is {used:,} tokens long in the chat format; the limit is {total:,} tokens "
                          "including the reply. Please shorten it.")
        return Fitted(prompt, total - used, len(turns) - len(kept))

    def trimmed_notice(self, dropped: int) -> gr.ChatMessage:
        turns = f"{dropped} turn{'s' if dropped > 1 else ''}"
        return gr.ChatMessage(
            role="assistant",
            content=f"The model no longer sees the oldest {turns} of this conversation: it reads at most "
            f"{self.limits.max_turns} turns and {self.max_total_tokens:,} tokens, its reply included. They stay on "
            "screen; clear the chat to start afresh.",
            metadata={"title": TRIMMED, "log": f"{turns} left out", "status": "done"},
        )

    def respond(self, message: str, history: list[dict], temperature: float, top_k: float,
                max_tokens: float) -> Iterator[str | list[gr.ChatMessage]]:
        """A generator method: gradio streams what a generator function yields (the cumulative reply: its text, or
        its bubbles when there is more than plain text)."""
        temperature, top_k, max_tokens = check_sampling(temperature, top_k, max_tokens)
        try:
            fitted = self.fit(message, history, max_tokens)
        except Refused as refusal:
            yield NOTICE + str(refusal)
            return
        lead = [self.trimmed_notice(fitted.dropped)] if fitted.dropped else []
        reply_ids: list[int] = []
        for _ in self.engine.stream_chat(
            fitted.messages,
            max_tokens=min(max_tokens, fitted.room),  # the reply stops at the conversation's token limit
            temperature=temperature,
            top_k=top_k,
            seed=random.randrange(2**31),  # nanochat's server drew a fresh seed per request
            reply_ids=reply_ids,
        ):
            # rebuilt from the tokens, not the streamed text, so tool blocks never show as code fences
            yield _response(lead + reply_messages(self.engine.reply_message(reply_ids)["content"], done=False))
        shown = reply_messages(self.engine.reply_message(reply_ids)["content"], done=True)
        yield _response(lead + (shown or [gr.ChatMessage(role="assistant",
                                                         content="(the model ended its reply without text)")]))


def _response(messages: list[gr.ChatMessage]) -> str | list[gr.ChatMessage]:
    """Plain text when that is all there is (what the /chat API has always returned), else the bubbles."""
    if len(messages) == 1 and not messages[0].metadata:
        return messages[0].content
    return messages


def build_demo(engine: Engine, limits: Limits, title: str) -> gr.ChatInterface:
    chat = Chat(engine, limits)
    max_reply = min(4096, chat.max_total_tokens)
    return gr.ChatInterface(
        chat.respond,
        api_name="chat",
        title=title,
        description=f"{limits.max_message_chars:,} characters per message. The model reads the last "
        f"{limits.max_turns} turns and at most {chat.max_total_tokens:,} tokens; older turns are dropped with a "
        "notice. Calculator calls show as blocks you can open.",
        additional_inputs=[
            gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="Temperature"),
            gr.Slider(0, 200, value=50, step=1, label="Top-k (0 = off)"),
            gr.Slider(1, max_reply, value=min(512, max_reply), step=1, label="Max new tokens"),
        ],
        additional_inputs_accordion=gr.Accordion("Sampling", open=False),
        # shown in the empty chat; clicking one sends it with the current sampling settings
        examples=[[text] for text in EXAMPLES],
        cache_examples=False,  # a Space would otherwise generate them at start-up, and sampling varies anyway
        stop_btn=True,
        fill_height=True,
    )


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    base, fixed = default_limits(), Limits()  # the NANOCHAT_* variables, where set, are the defaults
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Chat with a nanochat model in the browser: a Gradio app that streams replies, shows calculator "
        "calls as blocks, and drops the oldest turns (with a notice) when a conversation outgrows the limits.",
    )
    parser.add_argument("--model", help="model folder or Hub repo id (default: NANOCHAT_MODEL, else the repo in "
                        "space_config.json)")
    parser.add_argument("--host", default=None, help="address to bind (default: GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--max-message-chars", type=int, default=base.max_message_chars,
                        help="longest message a visitor may send, in characters; longer ones are refused "
                        f"(default: NANOCHAT_MAX_MESSAGE_CHARS or {fixed.max_message_chars})")
    parser.add_argument("--max-turns", type=int, default=base.max_turns,
                        help="turns the model reads, the new one included; older ones are dropped with a notice "
                        f"(default: NANOCHAT_MAX_TURNS or {fixed.max_turns})")
    parser.add_argument("--max-total-tokens", type=int, default=base.max_total_tokens,
                        help="prompt + reply tokens per conversation; older turns are dropped with a notice to stay "
                        "under it (default: NANOCHAT_MAX_TOTAL_TOKENS or the model's context)")
    parser.add_argument("--concurrency", type=int, default=base.concurrency,
                        help=f"generations at once (default: NANOCHAT_CONCURRENCY or {fixed.concurrency})")
    parser.add_argument("--queue-size", type=int, default=base.queue_size,
                        help="requests that may wait for a generation; more are turned away "
                        f"(default: NANOCHAT_QUEUE_SIZE or {fixed.queue_size})")
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
