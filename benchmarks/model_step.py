"""Training-step throughput of our NanoChatForCausalLM against transformers' built-in NanoChatForCausalLM.

Same 2025-generation config, same weights, same batch: forward + backward tokens/s on CPU, measured in interleaved
rounds so both models see the same machine conditions. Target: ours / built-in >= 1.0.

    python benchmarks/model_step.py [--depth 6] [--seq 512] [--batch 4] [--rounds 7] [--json out.json]
"""

import argparse
import json
import platform
import statistics
import time

import torch
import transformers

from nanochat_hf import NanoChatConfig, NanoChatForCausalLM
from nanochat_hf.hub.convert import builtin_config


def builtin_from(ours: NanoChatForCausalLM) -> transformers.NanoChatForCausalLM:
    config = builtin_config(ours.config)
    twin = transformers.NanoChatForCausalLM(config)
    twin.load_state_dict(ours.state_dict())
    return twin


def step_seconds(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = NanoChatConfig.from_depth(
        args.depth, "2025", head_dim=args.head_dim, vocab_size=args.vocab_size, max_position_embeddings=args.seq
    )
    ours = NanoChatForCausalLM(config).train()
    with torch.no_grad():  # nanochat zero-inits some matrices; random weights make the work realistic
        for p in ours.parameters():
            p.normal_(0, 0.02)
    builtin = builtin_from(ours).train()
    ids = torch.randint(0, args.vocab_size, (args.batch, args.seq))
    tokens = ids.numel()

    for model in (ours, builtin):  # warm-up
        step_seconds(model, ids, 1)
    times = {"ours": [], "builtin": []}
    for _ in range(args.rounds):
        times["ours"].append(step_seconds(ours, ids, args.steps))
        times["builtin"].append(step_seconds(builtin, ids, args.steps))
    ours_tps = tokens / statistics.median(times["ours"])
    builtin_tps = tokens / statistics.median(times["builtin"])
    result = {
        "benchmark": "model_step",
        "config": f"2025 generation, depth {args.depth}, head_dim {args.head_dim}, vocab {args.vocab_size}",
        "batch": f"{args.batch}x{args.seq}",
        "params": ours.num_parameters(),
        "ours_tokens_per_s": round(ours_tps, 1),
        "builtin_tokens_per_s": round(builtin_tps, 1),
        "ratio": round(ours_tps / builtin_tps, 3),
        "target": ">= 1.0",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
    }
    print(f"ours     {ours_tps:10.1f} tokens/s (fwd+bwd)")
    print(f"built-in {builtin_tps:10.1f} tokens/s (fwd+bwd)")
    print(f"ratio ours/built-in = {result['ratio']:.3f}  (target >= 1.0)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
