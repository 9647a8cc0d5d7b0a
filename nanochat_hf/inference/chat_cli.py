"""`nanochat-hf chat`: talk to a model in the terminal, streaming its replies (nanochat's chat_cli).

    nanochat-hf chat --model DIR|REPO            interactive; /clear, /temperature T, /help, /quit
    nanochat-hf chat --model DIR|REPO -p "..."   answer one prompt and exit

What is typed is text: special-token strings stay text (the chat template escapes them), bytes that are not UTF-8
become U+FFFD. When the conversation and a reply of --max-tokens no longer fit the model's context, the oldest turns
are dropped (a notice says so); a message too long on its own is refused with its length, and the chat goes on
(`-p`: exits with that error).
"""

import argparse
import os
import sys

import torch

from .engine import Engine, replace_invalid_utf8

HELP = "Commands: /clear (new conversation), /temperature T (0 = greedy), /help, /quit (or Ctrl-D)."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanochat-hf chat",
        description="Chat with a NanoChat model from a save_pretrained folder or a Hub repo id; replies stream as "
        "they are generated, calculator tool calls included.",
    )
    parser.add_argument("--model", "-m", required=True, help="model folder or Hub repo id (model + tokenizer)")
    parser.add_argument("--prompt", "-p", help="answer this one prompt and exit")
    parser.add_argument("--temperature", "-t", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", "-k", type=int, default=50, help="sample from the k most likely tokens (0 = all)")
    parser.add_argument("--max-tokens", type=int, default=256, help="longest reply, in tokens")
    parser.add_argument("--seed", type=int, default=42, help="random seed of the first reply (then +1 per reply)")
    parser.add_argument("--device", help="cpu, cuda, mps... (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="weights dtype (default: as saved)")
    return parser


def _load(args: argparse.Namespace) -> Engine:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    looks_local = os.path.isabs(args.model) or args.model.startswith((".", "~"))
    if looks_local and not os.path.isdir(os.path.expanduser(args.model)):
        raise SystemExit(f"nanochat-hf chat: error: no model folder at {args.model!r}; pass --model a folder written "
                         "by nanochat-hf (config.json, model.safetensors, tokenizer.json) or a Hub repo id.")
    try:
        return Engine.from_pretrained(os.path.expanduser(args.model), dtype=dtype, device=device)
    except (OSError, ValueError) as err:
        raise SystemExit(
            f"nanochat-hf chat: error: cannot load a model from {args.model!r}: {err}\n"
            "Pass --model a folder written by nanochat-hf (config.json, model.safetensors, tokenizer.json) "
            "or a Hub repo id of one."
        ) from err


class PromptTooLong(ValueError):
    """The newest message alone leaves no room for a reply of --max-tokens in the model's context."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context: int):
        super().__init__(
            f"the prompt is {prompt_tokens} tokens and the reply may take {max_tokens} (--max-tokens): "
            f"{prompt_tokens + max_tokens} in all, past the model's context of {context} tokens; shorten the message "
            "or lower --max-tokens"
        )


def fit_context(engine: Engine, messages: list[dict], max_tokens: int) -> tuple[list[dict], list[int], int]:
    """`messages` less as few of their oldest turns (a user message and the replies after it) as leave room for a
    reply of `max_tokens` in the context, a leading system message kept; with their prompt ids and how many turns
    were dropped. Raises PromptTooLong when the newest turn alone does not fit."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    starts = [i for i, m in enumerate(turns) if m["role"] == "user"]
    for dropped, start in enumerate(starts):
        kept = system + turns[start:]
        prompt = engine.render_prompt(kept)
        if len(prompt) + max_tokens <= engine.context_length:
            return kept, prompt, dropped
    raise PromptTooLong(len(prompt), max_tokens, engine.context_length)


class ChatSession:
    """A conversation in Hugging Face message format: replies streamed to `out`, notices about the input to `err`."""

    def __init__(self, engine: Engine, args: argparse.Namespace, out=None, err=None):
        self.engine = engine
        self.temperature = args.temperature
        self.top_k = args.top_k if args.top_k > 0 else None
        self.max_tokens = args.max_tokens
        self.seed = args.seed
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.messages: list[dict] = []

    def ask(self, text: str) -> list[int]:
        """Add the user's message and return the prompt for the reply. Bytes that were not UTF-8 become U+FFFD and
        the oldest turns are dropped when the context is full, each with a one-line notice. Raises PromptTooLong
        (the conversation unchanged) when the message alone leaves no room for the reply."""
        valid = replace_invalid_utf8(text)
        if valid != text:
            print("(the message was not valid UTF-8; the bad bytes were replaced by U+FFFD)", file=self.err)
        messages, prompt, dropped = fit_context(self.engine, [*self.messages, {"role": "user", "content": valid}],
                                                self.max_tokens)
        if dropped:
            print(f"(dropped the oldest {dropped} turn{'s' if dropped > 1 else ''} to fit the model's context of "
                  f"{self.engine.context_length} tokens with a reply of up to {self.max_tokens})", file=self.err)
        self.messages = messages
        return prompt

    def answer(self, prompt: list[int]) -> str:
        """Stream the reply to `prompt` (from `ask`) and add it to the conversation."""
        reply_ids: list[int] = []
        pieces = []
        for delta in self.engine.stream(prompt, self.max_tokens, self.temperature, self.top_k, self.seed,
                                        reply_ids=reply_ids):
            pieces.append(delta)
            self.out.write(delta)
            self.out.flush()
        self.out.write("\n")
        self.seed += 1
        # Keep the reply's structure (tool calls and outputs), so the next prompt renders it as generated.
        self.messages.append(self.engine.reply_message(reply_ids))
        return "".join(pieces)

    def command(self, line: str) -> bool:
        """Run a /command; False when the session should end."""
        name, _, value = line.partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/clear":
            self.messages = []
            print("(conversation cleared)", file=self.out)
        elif name == "/temperature":
            try:
                temperature = float(value)
                if not 0 <= temperature < float("inf"):
                    raise ValueError
            except ValueError:
                print(f"(/temperature needs a number >= 0, e.g. /temperature 0.6; got {value!r})", file=self.out)
            else:
                self.temperature = temperature
                print(f"(temperature {temperature:g})", file=self.out)
        elif name == "/help":
            print(HELP, file=self.out)
        else:
            print(f"(unknown command {name}) {HELP}", file=self.out)
        return True


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not 0 <= args.temperature < float("inf"):
        raise SystemExit(f"nanochat-hf chat: error: --temperature must be a number >= 0, got {args.temperature}")
    if args.max_tokens < 1:
        raise SystemExit(f"nanochat-hf chat: error: --max-tokens must be >= 1, got {args.max_tokens}")
    session = ChatSession(_load(args), args)
    if args.prompt is not None:
        try:
            prompt = session.ask(args.prompt)
        except PromptTooLong as err:
            raise SystemExit(f"nanochat-hf chat: error: {err}") from None
        session.answer(prompt)
        return
    # A line that is not UTF-8 arrives with its bad bytes escaped, for `ask` to replace, instead of ending the chat.
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    print(f"nanochat-hf chat with {args.model}. {HELP}")
    while True:
        try:
            line = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line:
            continue
        if line.startswith("/"):
            if not session.command(line):
                return
            continue
        try:
            prompt = session.ask(line)
        except PromptTooLong as err:
            print(f"({err})", file=session.err)
            continue
        print("Assistant: ", end="", flush=True)
        session.answer(prompt)


if __name__ == "__main__":
    main()
