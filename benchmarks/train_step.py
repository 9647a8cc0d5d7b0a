"""Training-step overheads, side by side in one run: the Trainer against a plain loop, and our Muon against torch's.

1. Pretraining tokens/s of `nanochat_hf.training.pretrain.train` (PretrainTrainer on transformers' Trainer) against the same
   run written as a plain PyTorch loop, as tests/test_pretrain.py::test_trainer_matches_a_plain_pytorch_loop writes
   it: same model, seed, data stream, MuonAdamW + NanoChatSchedule and gradient accumulation, no Trainer, no
   Accelerate. Start-up is excluded: each run does --steps optimizer steps and the clock covers steps
   --skip+1 .. --steps, from the end of one optimizer step to the end of another (the Trainer's through an
   `on_step_end` callback, which fires before the checkpoint and final model `train()` writes). No evaluation, no
   checkpoint inside the window. Rounds alternate (Trainer, plain, Trainer, plain, ...); medians are compared, and
   the per-step losses of both runs must agree (they are the same run). Target: Trainer / plain >= 0.97.

2. Seconds per `step()` of our Muon on nanochat-d12-shaped matrices (hidden 768, 12 layers; per layer q, k, v, o
   768x768, fc1 3072x768, fc2 768x3072; ve_gate left out), fp32 parameters with fixed random gradients:
   MuonAdamW in nanochat's default configuration (one group per shape; Polar Express, NorMuon, cautious weight
   decay, MuonEq, Muon+) against torch.optim.Muon (lr 0.02, adjust_lr_fn="original"), interleaved rounds, medians.
   Target: ours / torch <= 1.0. MuonAdamW in the classic configuration (Newton-Schulz, none of the extras; the
   same maths as torch.optim.Muon, stacked per shape) is reported for reference, and so is the default configuration
   on the compiled path (`compile_step=True`: torch.compile'd parts, whole stacks), which decides MuonAdamW's CPU
   default. Its compile time is kept out of the rounds and reported apart: the warm-up step's time less a median
   step, compiled with inductor's caches off (as on a fresh machine) unless --muon-compile-cache.

The corpus (the embedded one, as jsonl) and the tokenizer are built once in a temporary folder.

    python benchmarks/train_step.py [--rounds 4] [--steps 10] [--muon-rounds 3] [--json out.json]
    python benchmarks/train_step.py --only muon --muon-layers 2     # quick look at the optimizer part
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor.config
import transformers
from transformers import TrainerCallback

from nanochat_hf.data.embedded import embedded_corpus
from nanochat_hf.data.pretrain import PretrainStream
from nanochat_hf.tokenizer.bpe import load_tokenizer, train_tokenizer
from nanochat_hf.training import pretrain
from nanochat_hf.training.optim import MuonAdamW, NanoChatSchedule, nanochat_param_groups
from nanochat_hf.training.plan import plan_training

TRAINER_TARGET = 0.97
MUON_TARGET = 1.0


# ---------------------------------------------------------------------------------------------------------------
# the machine


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


# ---------------------------------------------------------------------------------------------------------------
# 1. Trainer against a plain loop


def build_workdir(root: Path, corpus_chars: int, vocab_size: int) -> None:
    """A jsonl corpus in three shards and a tokenizer trained on it."""
    docs = list(embedded_corpus(max_chars=corpus_chars))
    (root / "corpus").mkdir(parents=True)
    for i in range(3):
        with open(root / "corpus" / f"shard_{i}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs[i::3])
    tokenizer = train_tokenizer(embedded_corpus(max_chars=corpus_chars), vocab_size=vocab_size, show_progress=False)
    tokenizer.save_pretrained(root / "tokenizer")


def run_argv(args: argparse.Namespace, root: Path, out: Path) -> list[str]:
    fields = dict(
        output_dir=out, tokenizer=root / "tokenizer", dataset=root / "corpus", depth=args.depth,
        head_dim=args.head_dim, max_seq_len=args.seq, window_pattern=args.window_pattern,
        device_batch_size=args.device_batch, total_batch_size=args.total_batch, num_iterations=args.steps,
        warmup_steps=2, weight_decay=0.28, eval_every=-1, save_every=10**9, keep_last=1, log_every=args.log_every,
        num_workers=args.num_workers,
    )
    return [arg for key, value in fields.items() for arg in (f"--{key}", str(value))]


class StepClock(TrainerCallback):
    """perf_counter() at the end of every optimizer step (after the scheduler step and zero_grad)."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def trainer_round(args: argparse.Namespace, root: Path, out: Path) -> dict:
    """One `pretrain.train()` run, its PretrainTrainer given a StepClock."""
    clock = StepClock()
    original = pretrain.PretrainTrainer

    class ClockedTrainer(original):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.add_callback(clock)

    run = pretrain.parse_args(run_argv(args, root, out))
    start = time.perf_counter()
    pretrain.PretrainTrainer = ClockedTrainer
    try:
        # the Trainer's progress bar and log lines go to a file, as in a run under nohup
        with open(out.parent / f"{out.name}.log", "w") as log, contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log):
            pretrain.train(run)
    finally:
        pretrain.PretrainTrainer = original
    losses = [json.loads(line)["loss"] for line in (out / "losses.jsonl").read_text().splitlines()]
    return {"start": start, "times": clock.times, "losses": losses}


def plain_round(args: argparse.Namespace, root: Path, out: Path) -> dict:
    """The same run as nanochat writes it (the parity test's loop)."""
    start = time.perf_counter()
    run = pretrain.parse_args(run_argv(args, root, out))
    tokenizer = load_tokenizer(run.tokenizer)
    model = pretrain.build_pretrain_model(run, tokenizer).train()
    plan = plan_training(model.config, device_batch_size=run.device_batch_size, world_size=1,
                         total_batch_size=run.total_batch_size, num_iterations=run.num_iterations,
                         weight_decay=run.weight_decay)
    optimizer = MuonAdamW(nanochat_param_groups(model, weight_decay=plan.weight_decay,
                                                batch_lr_scale=plan.batch_lr_scale))
    schedule = NanoChatSchedule(optimizer, total_steps=run.num_iterations, warmup_steps=run.warmup_steps,
                                warmdown_ratio=run.warmdown_ratio, final_lr_frac=run.final_lr_frac)
    batches = iter(PretrainStream(run.dataset, tokenizer, run.device_batch_size, run.max_seq_len,
                                  num_workers=run.num_workers))
    accum = plan.gradient_accumulation_steps
    times, losses = [], []
    for _ in range(run.num_iterations):
        total = 0.0
        for _ in range(accum):
            batch = next(batches)
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"], shift_labels=batch["labels"]).loss
            (loss / accum).backward()
            total += loss.item() / accum
        optimizer.step()
        schedule.step()
        model.zero_grad(set_to_none=True)
        losses.append(total)
        times.append(time.perf_counter())
    return {"start": start, "times": times, "losses": losses}


def tokens_per_s(result: dict, skip: int, tokens_per_step: int) -> float:
    times = result["times"]
    return (len(times) - skip) * tokens_per_step / (times[-1] - times[skip - 1])


def bench_trainer(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="train_step_bench_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        build_workdir(root, args.corpus_chars, args.vocab_size)
        print(f"[trainer] corpus {args.corpus_chars:,} chars and tokenizer (vocab {args.vocab_size}) built in "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
        tps = {"trainer": [], "plain": []}
        startup = {"trainer": [], "plain": []}
        max_loss_diff = 0.0
        for r in range(args.rounds):
            results = {}
            for name, fn in (("trainer", trainer_round), ("plain", plain_round)):
                results[name] = result = fn(args, root, root / f"{name}_{r}")
                if len(result["times"]) != args.steps:
                    raise SystemExit(f"{name} round {r}: {len(result['times'])} optimizer steps, not {args.steps}")
                tps[name].append(tokens_per_s(result, args.skip, args.total_batch))
                startup[name].append(result["times"][0] - result["start"])
                print(f"[trainer] round {r + 1}/{args.rounds} {name:7s} {tps[name][-1]:9.1f} tokens/s "
                      f"(start-up + step 1: {startup[name][-1]:.1f}s)", flush=True)
            diff = max(abs(a - b) for a, b in zip(results["trainer"]["losses"], results["plain"]["losses"],
                                                   strict=True))
            max_loss_diff = max(max_loss_diff, diff)
    ours, plain = statistics.median(tps["trainer"]), statistics.median(tps["plain"])
    return {
        "config": f"depth {args.depth}, head_dim {args.head_dim}, vocab {args.vocab_size}, window "
                  f"{args.window_pattern}, seq {args.seq}, device batch {args.device_batch}, "
                  f"{args.total_batch} tokens/step (grad accum {args.total_batch // (args.device_batch * args.seq)}), "
                  f"num_workers {args.num_workers}, log_every {args.log_every}",
        "timed_steps": f"{args.skip + 1}..{args.steps} of {args.steps}",
        "trainer_tokens_per_s": round(ours, 1),
        "plain_tokens_per_s": round(plain, 1),
        "ratio": round(ours / plain, 3),
        "target": f">= {TRAINER_TARGET}",
        "met": ours / plain >= TRAINER_TARGET,
        "rounds": {k: [round(x, 1) for x in v] for k, v in tps.items()},
        "startup_s_median": {k: round(statistics.median(v), 2) for k, v in startup.items()},
        "max_loss_diff": max_loss_diff,
    }


# ---------------------------------------------------------------------------------------------------------------
# 2. our Muon against torch.optim.Muon


def d12_shapes(hidden: int, layers: int) -> list[tuple[int, int]]:
    per_layer = [(hidden, hidden)] * 4 + [(4 * hidden, hidden), (hidden, 4 * hidden)]
    return per_layer * layers


def fresh_params(shapes: list[tuple[int, int]], seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        p.grad = torch.randn(shape, generator=gen)
        params.append(p)
    return params


def muon_groups(params: list[torch.nn.Parameter], lr: float, weight_decay: float, beta2: float | None) -> list[dict]:
    shapes = sorted({tuple(p.shape) for p in params})
    return [dict(kind="muon", params=[p for p in params if tuple(p.shape) == s], lr=lr, momentum=0.95, ns_steps=5,
                 beta2=beta2, weight_decay=weight_decay) for s in shapes]


def step_seconds(optimizer: torch.optim.Optimizer, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - start) / steps


def bench_muon(args: argparse.Namespace) -> dict:
    shapes = d12_shapes(args.muon_hidden, args.muon_layers)
    lr, wd = 0.02, 0.28
    # torch.optim.Muon orthogonalises in bf16; ours is pinned to the same dtype so the race is the same arithmetic
    # (a CPU training run in fp32 orthogonalises in fp32, as nanochat does).
    bf16 = torch.bfloat16
    optimizers = {
        "ours": MuonAdamW(muon_groups(fresh_params(shapes, 0), lr, wd, beta2=0.9), compile_step=False,
                          ortho_dtype=bf16),
        "ours_compiled": MuonAdamW(muon_groups(fresh_params(shapes, 0), lr, wd, beta2=0.9), compile_step=True,
                                   ortho_dtype=bf16),
        "ours_classic": MuonAdamW(muon_groups(fresh_params(shapes, 0), lr, wd, beta2=None),
                                  orthogonalizer="newton_schulz", row_equilibration=False, renormalize=False,
                                  cautious_weight_decay=False, compile_step=False, ortho_dtype=bf16),
        "torch": torch.optim.Muon(fresh_params(shapes, 0), lr=lr, weight_decay=wd, momentum=0.95, nesterov=True,
                                  ns_steps=5, adjust_lr_fn="original"),
    }
    warmup = {}
    with torch._inductor.config.patch(force_disable_caches=not args.muon_compile_cache):
        for name, opt in optimizers.items():  # warm-up: state allocation, first-call costs, compilation
            warmup[name] = step_seconds(opt, 1)
            print(f"[muon] warm-up {name}: {warmup[name]:.2f}s", flush=True)
    times = {name: [] for name in optimizers}
    loads = []
    for r in range(args.muon_rounds):
        for name, opt in optimizers.items():
            times[name].append(step_seconds(opt, args.muon_steps))
        loads.append(load_average())
        print(f"[muon] round {r + 1}/{args.muon_rounds} " + "  ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items())
              + f"  (load average {loads[-1]})", flush=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "config": f"{len(shapes)} fp32 matrices, d12 shapes (hidden {args.muon_hidden}, {args.muon_layers} layers: "
                  "q,k,v,o HxH, fc1 4HxH, fc2 Hx4H), random gradients",
        "params": sum(a * b for a, b in shapes),
        "ours_s_per_step": round(med["ours"], 4),
        "ours_compiled_s_per_step": round(med["ours_compiled"], 4),
        "ours_classic_s_per_step": round(med["ours_classic"], 4),
        "torch_s_per_step": round(med["torch"], 4),
        "ratio": round(med["ours"] / med["torch"], 3),
        "compiled_ratio": round(med["ours_compiled"] / med["torch"], 3),
        "compiled_over_eager": round(med["ours_compiled"] / med["ours"], 3),
        "classic_ratio": round(med["ours_classic"] / med["torch"], 3),
        "compile_s": round(warmup["ours_compiled"] - med["ours_compiled"], 2),
        "compile_caches": "on" if args.muon_compile_cache else "off",
        "target": f"<= {MUON_TARGET}",
        "met": med["ours"] / med["torch"] <= MUON_TARGET,
        "rounds": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "load_average_per_round": loads,
    }


# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["trainer", "muon"], help="run one of the two benchmarks")
    g = parser.add_argument_group("1. Trainer vs plain loop")
    g.add_argument("--depth", type=int, default=4)
    g.add_argument("--head-dim", type=int, default=64)
    g.add_argument("--window-pattern", default="L")
    g.add_argument("--seq", type=int, default=256)
    g.add_argument("--device-batch", type=int, default=8)
    g.add_argument("--total-batch", type=int, default=4096, help="tokens per optimizer step (sets grad accum)")
    g.add_argument("--vocab-size", type=int, default=4096)
    g.add_argument("--corpus-chars", type=int, default=1_500_000)
    g.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    g.add_argument("--skip", type=int, default=2, help="steps left out of the clock (start-up)")
    g.add_argument("--rounds", type=int, default=4)
    g.add_argument("--num-workers", type=int, default=0, help="tokenizing DataLoader workers, both loops")
    g.add_argument("--log-every", type=int, default=1, help="the Trainer's logging_steps")
    g = parser.add_argument_group("2. Muon vs torch.optim.Muon")
    g.add_argument("--muon-hidden", type=int, default=768)
    g.add_argument("--muon-layers", type=int, default=12)
    g.add_argument("--muon-steps", type=int, default=1, help="timed step() calls per round")
    g.add_argument("--muon-rounds", type=int, default=3)
    g.add_argument("--muon-compile-cache", action="store_true",
                   help="let the compiled contender use inductor's on-disk caches (its compile time is then not a "
                        "fresh machine's)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    if not 1 <= args.skip < args.steps:
        parser.error("--skip must be at least 1 and below --steps")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    result = {"benchmark": "train_step", "machine": machine(), "load_average_start": load_average()}
    if args.only in (None, "trainer"):
        result["trainer_vs_plain"] = bench_trainer(args)
    if args.only in (None, "muon"):
        result["muon_vs_torch"] = bench_muon(args)
    result["load_average_end"] = load_average()

    m = result["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cpu_count']} cores, {m['torch_threads']} torch threads, {m['platform']}, "
          f"torch {m['torch']}, transformers {m['transformers']}; load average {result['load_average_start']} -> "
          f"{result['load_average_end']}")
    if "trainer_vs_plain" in result:
        t = result["trainer_vs_plain"]
        print(f"\n1. {t['config']}; steps {t['timed_steps']} timed, median of {args.rounds} rounds")
        print(f"   Trainer     {t['trainer_tokens_per_s']:10.1f} tokens/s")
        print(f"   plain loop  {t['plain_tokens_per_s']:10.1f} tokens/s   (losses agree to {t['max_loss_diff']:.1e})")
        print(f"   ratio Trainer/plain = {t['ratio']:.3f}  (target {t['target']}: {'met' if t['met'] else 'MISSED'})")
    if "muon_vs_torch" in result:
        u = result["muon_vs_torch"]
        print(f"\n2. {u['config']}; median of {args.muon_rounds} rounds")
        print(f"   ours (nanochat default)      {u['ours_s_per_step']:8.3f} s/step")
        print(f"   ours, compiled               {u['ours_compiled_s_per_step']:8.3f} s/step   "
              f"(ratio to torch {u['compiled_ratio']:.3f}, to eager {u['compiled_over_eager']:.3f}; compile "
              f"{u['compile_s']:.1f}s, caches {u['compile_caches']})")
        print(f"   ours (classic Newton-Schulz) {u['ours_classic_s_per_step']:8.3f} s/step   "
              f"(ratio to torch {u['classic_ratio']:.3f}, reference)")
        print(f"   torch.optim.Muon             {u['torch_s_per_step']:8.3f} s/step")
        print(f"   ratio ours/torch = {u['ratio']:.3f}  (target {u['target']}: {'met' if u['met'] else 'MISSED'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
