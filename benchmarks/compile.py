"""One training step of the CPU tier's model, eager against compiled, side by side in one run.

The model is the CPU tier's (recipes/cpu/pretrain.yaml: depth 4, head_dim 64, window pattern L, T=512, device batch
8, the 8,192-token vocabulary of its tokenizer); a step is forward + backward + MuonAdamW (nanochat's groups), the
work `nanochat-hf pretrain` does per optimizer step there. The compiled contender is the same model compiled in
place the way `--torch_compile true` does it (`model.compile(dynamic=False)`), on a copy of the same weights.
Compilation is timed apart. Rounds alternate (eager, compiled, eager, ...) and the medians are compared; the first
step's losses (same weights, same batch) must agree to rounding.

    python benchmarks/compile.py [--rounds 5] [--steps 4] [--json out.json]
    python benchmarks/compile.py --window-pattern SSSL --generation 2026   # the short-window (banded) path
"""

import argparse
import copy
import json
import statistics
import time

import torch
from train_step import load_average, machine  # a sibling script

from nanochat_hf import NanoChatConfig, NanoChatForCausalLM
from nanochat_hf.training.optim import MuonAdamW, nanochat_param_groups


def build(args: argparse.Namespace) -> NanoChatForCausalLM:
    config = NanoChatConfig.from_depth(args.depth, args.generation, head_dim=args.head_dim, vocab_size=args.vocab_size,
                                       max_position_embeddings=args.seq, window_pattern=args.window_pattern)
    torch.manual_seed(0)
    return NanoChatForCausalLM(config).train()


def run_steps(model: NanoChatForCausalLM, optimizer: MuonAdamW, batches: list[torch.Tensor]) -> tuple[float, list]:
    """Seconds per optimizer step over `batches`, and the losses."""
    losses = []
    start = time.perf_counter()
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return (time.perf_counter() - start) / len(batches), losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--generation", default="2026")
    parser.add_argument("--window-pattern", default="L")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()

    eager = build(args)
    compiled = copy.deepcopy(eager)
    optimizers = {"eager": MuonAdamW(nanochat_param_groups(eager, weight_decay=0.0)),
                  "compiled": MuonAdamW(nanochat_param_groups(compiled, weight_decay=0.0))}
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab_size, (args.batch, args.seq), generator=gen) for _ in range(args.steps)]

    # compilation (and the first, slow steps of both) outside the clock
    start = time.perf_counter()
    compiled.compile(dynamic=False)
    _, warm_c = run_steps(compiled, optimizers["compiled"], batches[:2])
    compile_s = time.perf_counter() - start
    _, warm_e = run_steps(eager, optimizers["eager"], batches[:2])

    times = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        for name, model in (("eager", eager), ("compiled", compiled)):
            seconds, _ = run_steps(model, optimizers[name], batches)
            times[name].append(seconds)
    # The first step starts from identical weights, so its losses must agree to rounding. Later steps drift apart:
    # Muon orthogonalises in bf16, where a last-bit difference in a gradient becomes a bf16 rounding flip.
    drift = abs(warm_e[0] - warm_c[0])
    tokens = args.batch * args.seq
    result = {
        "machine": machine(), "load_average": load_average(), "args": vars(args),
        "compile_seconds": round(compile_s, 1),
        "tokens_per_s": {name: round(tokens / statistics.median(ts), 1) for name, ts in times.items()},
        "seconds_per_step": {name: [round(t, 4) for t in ts] for name, ts in times.items()},
        "first_step_loss_difference": drift,
    }
    result["ratio"] = round(result["tokens_per_s"]["compiled"] / result["tokens_per_s"]["eager"], 3)
    print(json.dumps(result, indent=2))
    print(f"\ncompiled / eager: {result['ratio']:.3f}x tokens/s "
          f"({result['tokens_per_s']['compiled']:.0f} vs {result['tokens_per_s']['eager']:.0f}); "
          f"compilation {compile_s:.0f} s; first-step losses agree to {drift:.1e}")
    if drift > 1e-4:
        raise SystemExit(f"eager and compiled disagree on the first step's loss by {drift:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
