"""Generation speed of `nanochat_hf.inference.engine.Engine` against `model.generate` with transformers' DynamicCache.

Same model, same prompt, greedy decoding, exactly `--new-tokens` tokens per row (stop tokens are ignored on both
sides so both do the same work; the tokens are checked to be identical). For batch 1 and batch 8 (eight samples of
one prompt) it reports time to first token (TTFT), decode tokens/s after the first token, and end-to-end tokens/s,
in interleaved rounds so both see the same machine conditions (ratios: median over rounds of the
per-round ratio). Target (CPU): end-to-end ratio engine / generate
>= 1.0 at batch 1 and >= 1.5 at batch 8.

    python benchmarks/generate.py [--depth 6] [--prompt-tokens 512] [--new-tokens 256] [--rounds 5] [--threads 1]
        [--json out.json]
"""

import argparse
import json
import platform
import statistics
import time

import torch
import transformers
from transformers.generation.streamers import BaseStreamer

from nanochat_hf import NanoChatConfig, NanoChatForCausalLM
from nanochat_hf.inference.engine import Engine
from nanochat_hf.tokenizer.bpe import SPECIAL_TOKENS, tokenizer_from_merges


class FirstTokenClock(BaseStreamer):
    """Notes when `generate` hands over its first new token (its first `put` is the prompt)."""

    def __init__(self):
        self.puts = 0
        self.first_token_at = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def run_generate(model, prompt: list[int], batch: int, new_tokens: int) -> tuple[float, float, list[int]]:
    ids = torch.tensor([prompt] * batch)
    clock = FirstTokenClock()
    start = time.perf_counter()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, streamer=clock,
        eos_token_id=None, pad_token_id=0,
    )
    total = time.perf_counter() - start
    return clock.first_token_at - start, total, out[0, len(prompt) :].tolist()


def run_engine(engine: Engine, prompt: list[int], batch: int, new_tokens: int) -> tuple[float, float, list[int]]:
    start = time.perf_counter()
    first, row0 = None, []
    for column, _ in engine.generate(prompt, num_samples=batch, max_tokens=new_tokens, temperature=0.0):
        if first is None:
            first = time.perf_counter()
        row0.append(column[0])
    return first - start, time.perf_counter() - start, row0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--window-pattern", default="L", help="nanochat's runcpu.sh uses L (full context)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steady numbers on a shared machine; 0: torch's default)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    # A byte-level tokenizer gives the engine nanochat's special ids; the model's vocabulary is full size so the
    # LM head costs what it costs in a real run. Random weights: the work per token is what matters here.
    tokenizer = tokenizer_from_merges({bytes([b]): b for b in range(256)}, [])
    special = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    torch.manual_seed(0)
    config = NanoChatConfig.from_depth(
        args.depth, "2026", head_dim=args.head_dim, vocab_size=args.vocab_size, window_pattern=args.window_pattern,
        max_position_embeddings=args.prompt_tokens + args.new_tokens, bos_token_id=special["<|bos|>"],
    )
    model = NanoChatForCausalLM(config).eval()
    with torch.no_grad():  # nanochat zero-inits some matrices; random weights make the work realistic
        for p in model.parameters():
            p.normal_(0, 0.02)
    engine = Engine(model, tokenizer)
    engine.stop_ids = frozenset()  # generate exactly --new-tokens, like generate(eos_token_id=None)
    prompt = [special["<|bos|>"]] + torch.randint(0, 256, (args.prompt_tokens - 1,)).tolist()

    results = []
    with torch.inference_mode():
        for batch in [int(b) for b in args.batches.split(",")]:
            run_generate(model, prompt, batch, 8)  # warm-up
            run_engine(engine, prompt, batch, 8)
            runs = {"engine": [], "generate": []}
            same = True
            for round_ in range(args.rounds):
                # alternate who goes first, so a drift in machine load does not favour either side
                order = ("generate", "engine") if round_ % 2 == 0 else ("engine", "generate")
                tokens = {}
                for name in order:
                    if name == "generate":
                        ttft, total, tokens[name] = run_generate(model, prompt, batch, args.new_tokens)
                    else:
                        ttft, total, tokens[name] = run_engine(engine, prompt, batch, args.new_tokens)
                    decode = batch * (args.new_tokens - 1) / (total - ttft)
                    runs[name].append({"ttft_s": ttft, "decode_tokens_per_s": decode,
                                       "end_to_end_tokens_per_s": batch * args.new_tokens / total})
                same = same and tokens["generate"] == tokens["engine"]
            row = {"batch": batch, "same_tokens": same}
            for name, rounds in runs.items():
                row[name] = {m: round(statistics.median(r[m] for r in rounds), 4 if m == "ttft_s" else 1)
                             for m in rounds[0]}
            # ratios per round (both sides measured back to back), then the median over rounds
            for metric in ("ttft_s", "decode_tokens_per_s", "end_to_end_tokens_per_s"):
                pairs = zip(runs["engine"], runs["generate"], strict=True)
                ratios = [g[metric] / e[metric] if metric == "ttft_s" else e[metric] / g[metric] for e, g in pairs]
                row[f"ratio_{metric}"] = round(statistics.median(ratios), 3)
            results.append(row)
            print(json.dumps(row))

    summary = {
        "benchmark": "generate",
        "config": f"2026 generation, depth {args.depth}, head_dim {args.head_dim}, vocab {args.vocab_size}, "
        f"window {args.window_pattern}, {model.num_parameters():,} params, fp32",
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "results": results,
        "target": "end-to-end ratio >= 1.0 at batch 1, >= 1.5 at batch 8 (ratios are engine / generate; "
        "for TTFT generate / engine)",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
