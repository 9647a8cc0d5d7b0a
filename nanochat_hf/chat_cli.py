"""`nanochat-hf chat`: talk to a model in the terminal, streaming its replies (nanochat's chat_cli).

    nanochat-hf chat --model DIR|REPO            interactive; /clear, /temperature T, /help, /quit
    nanochat-hf chat --model DIR|REPO -p "..."   answer one prompt and exit
"""

import argparse
import os
import sys

import torch

from .engine import Engine

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


class ChatSession:
    """A conversation in Hugging Face message format, replies streamed to `out`."""

    def __init__(self, engine: Engine, args: argparse.Namespace, out=None):
        self.engine = engine
        self.temperature = args.temperature
        self.top_k = args.top_k if args.top_k > 0 else None
        self.max_tokens = args.max_tokens
        self.seed = args.seed
        self.out = out if out is not None else sys.stdout
        self.messages: list[dict] = []

    def reply(self, text: str) -> str:
        self.messages.append({"role": "user", "content": text})
        reply_ids: list[int] = []
        pieces = []
        for delta in self.engine.stream_chat(self.messages, self.max_tokens, self.temperature, self.top_k,
                                             self.seed, reply_ids=reply_ids):
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
                if not temperature >= 0:
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
    if args.temperature < 0:
        raise SystemExit(f"nanochat-hf chat: error: --temperature must be >= 0, got {args.temperature}")
    if args.max_tokens < 1:
        raise SystemExit(f"nanochat-hf chat: error: --max-tokens must be >= 1, got {args.max_tokens}")
    session = ChatSession(_load(args), args)
    if args.prompt is not None:
        session.reply(args.prompt)
        return
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
        print("Assistant: ", end="", flush=True)
        session.reply(line)


if __name__ == "__main__":
    main()
