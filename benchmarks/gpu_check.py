"""The GPU check: d20 pretraining throughput per attention backend x torch.compile x fp8, and decode speed, in one run.

For a d20 model (`NanoChatConfig.from_depth(20, "2026")`, T=2048) it trains `--steps` optimizer steps per variant
the way our pretraining does (MuonAdamW on nanochat's parameter groups, fp32 master weights, bf16 autocast for the
forward, the loss computed inside the model from `labels`/`shift_labels`, no gradient clipping) and reports per
variant: tokens/s (median step time over the steps after the first `--skip`, the GPU synchronised before each clock
read), MFU by nanochat's formula (`model.estimate_flops_per_token(T)` x tokens/s over the bf16 peak: H100 and H200
989e12, A100 312e12; fp8 runs are divided by the same bf16 peak, as nanochat does), peak memory, and the loss at
step `--loss-step` against the sdpa/eager/bf16 baseline. Every variant starts from the same weights and sees the
same synthetic batches, so the losses are comparable: a wrong mask or a broken fp8 cast shows there. The stream is
learnable (every second token is a fixed permutation of the one before), so the loss moves within ten steps.

Variants, most important first, so a budget cut drops the least useful: sdpa eager bf16 (the baseline), sdpa
compiled, sdpa compiled fp8, the other backends compiled (bf16, then fp8), sdpa eager fp8, the other backends eager.
Backends: sdpa, kernels-community/flash-attn3, flash_attention_2, flex_attention; one that cannot run here is listed
as skipped with the reason. A variant that runs out of memory at `--batch` sequences per micro-step is retried with
half as many and gradient accumulation, so it still steps on the same `--batch` rows. A variant is not started when
it would end after `--budget-s` (less the time kept for the decode benchmark); it is listed as "skipped: budget".

Then decode tokens/s of `nanochat_hf.inference.engine.Engine` against `model.generate` (DynamicCache) at batch 1 and 8: bf16
weights, greedy, exactly `--new-tokens` tokens per row (stop tokens ignored on both sides), as benchmarks/generate.py
measures on CPU.

Targets (d20, one GPU): the best bf16 variant >= 45% MFU (nanochat: 47-51% on 8xH100); fp8 >= 1.15x the bf16 tokens/s
of the same backend and compile mode (nanochat measured 1.17x at d26).

    python benchmarks/gpu_check.py                                   # on one H100/H200; about 7-8 minutes
    python benchmarks/gpu_check.py --batch 16 --steps 20 --backends sdpa,flex_attention --compile on
    python benchmarks/gpu_check.py --smoke --json /tmp/gpu_check.json   # the same code on CPU, tiny model, ~30 s

The table is printed row by row as variants finish and again in full at the end; everything measured goes to
`$OUT/gpu_check.json` when the environment sets OUT, and to `--json` when given. benchmarks/README.md says how to
run it on a bare GPU machine.
"""

import time

_START = time.monotonic()  # the budget counts from here: interpreter start-up aside, imports included

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

# The GPU machine has no network: a Hub lookup (a kernel, a config) would only wait on time-outs. Set before
# huggingface_hub is imported, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Measure the checkout this script sits in, not an installed copy that may be older.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

from nanochat_hf import NanoChatConfig, NanoChatForCausalLM  # noqa: E402
from nanochat_hf.training.optim import MuonAdamW, nanochat_param_groups  # noqa: E402
from nanochat_hf.training.plan import gpu_peak_flops  # noqa: E402

BACKENDS = ("sdpa", "kernels-community/flash-attn3", "flash_attention_2", "flex_attention")
MFU_TARGET = 0.45
OVERRUN_S = 45.0  # how far past --budget-s a running variant may go before it stops stepping
FP8_TARGET = 1.15

# Two profiles: the real check, and --smoke (the same code on CPU with a tiny model, for the test suite).
FULL = dict(depth=20, head_dim=None, vocab_size=None, seq=2048, batch=32, steps=30, skip=5, precision="bf16",
            compile_backend="inductor", budget_s=450.0, decode_reserve_s=45.0, prompt_tokens=512, new_tokens=128,
            decode_rounds=2, eager_guess_s=60.0, compiled_guess_s=120.0)
SMOKE = dict(depth=2, head_dim=32, vocab_size=512, seq=128, batch=4, steps=3, skip=1, precision="fp32",
             # aot_eager traces the whole model through dynamo and AOT autograd as inductor would, without needing a
             # C++ compiler or a minute of code generation on two cores
             compile_backend="aot_eager", budget_s=240.0, decode_reserve_s=20.0, prompt_tokens=32, new_tokens=16,
             decode_rounds=1, eager_guess_s=5.0, compiled_guess_s=30.0)


# ---------------------------------------------------------------------------------------------------------------
# the machine


def version(dist: str) -> str | None:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(dist)
    return None


def machine(device: torch.device) -> dict:
    gpu = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    return {
        "device": torch.cuda.get_device_name(device) if gpu else f"CPU ({platform.processor() or platform.machine()})",
        "gpu_memory_gib": round(gpu.total_memory / 2**30, 1) if gpu else None,
        "compute_capability": f"{gpu.major}.{gpu.minor}" if gpu else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,  # the imported one: PYTHONPATH may shadow the machine's own
        "triton": version("triton"),
        "torchao": version("torchao"),
        "flash_attn": version("flash_attn") or version("flash-attn"),
        "kernels": version("kernels"),
        "platform": platform.platform(),
    }


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return gpu_peak_flops(torch.cuda.get_device_name(device))


# ---------------------------------------------------------------------------------------------------------------
# what can run here


def backend_unavailable(name: str, device: torch.device) -> str | None:
    """Why attention backend `name` cannot run on this machine, or None. The model's own support is checked later,
    when the backend is set on it."""
    if name == "sdpa":
        return None
    if name == "flex_attention":
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError as e:
            return f"torch.nn.attention.flex_attention not importable ({e})"
        # torch's FlexAttention has no backward pass on CPU, so it cannot train there
        return None if device.type == "cuda" else "FlexAttention trains on CUDA only (no backward pass on CPU)"
    if name == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            return ("flash_attn not installed (PyPI has only its source distribution, which compiles against CUDA "
                    "for an hour; no wheel is carried)")
        return None if device.type == "cuda" else "needs a CUDA device"
    if name.startswith("kernels-community/"):
        if importlib.util.find_spec("kernels") is None:
            return ("the `kernels` package is not installed, and the kernel itself downloads from the Hub, which the "
                    "GPU machine cannot reach")
        return None if device.type == "cuda" else "needs a CUDA device"
    return f"unknown backend {name!r}"


def fp8_unavailable(device: torch.device) -> str | None:
    """Why fp8 training cannot run here (nanochat_hf.training.fp8's own check), or None."""
    try:
        from nanochat_hf.training.fp8 import check_fp8_support
    except ImportError as e:
        return f"nanochat_hf.training.fp8 not importable ({e})"
    try:
        check_fp8_support(device)
    except Exception as e:  # RuntimeError by its contract; an import inside it may raise others
        return f"{type(e).__name__}: {first_line(e, limit=400)}"
    return None


def is_out_of_memory(error: BaseException) -> bool:
    """An out-of-memory error, also when torch.compile wrapped it (BackendCompilerFailed during autotuning)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower():
            return True
        error = getattr(error, "inner_exception", None) or error.__cause__ or error.__context__
    return False


def first_line(error: BaseException | str, limit: int = 160) -> str:
    text = str(error).strip().splitlines()
    text = text[0] if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------
# the training variants


@dataclass(frozen=True)
class Variant:
    backend: str
    compiled: bool
    fp8: bool

    def name(self, precision: str) -> str:
        return f"{self.backend}/{'compile' if self.compiled else 'eager'}/{'fp8' if self.fp8 else precision}"


def plan_variants(backends: list[str], compiles: list[bool], fp8s: list[bool]) -> list[Variant]:
    """Most useful first: the sdpa baseline, sdpa compiled as pretraining runs it, the same in fp8, then the other
    backends compiled (bf16, then fp8), then the eager rest. Within a tier, in the order of `backends`."""

    def tier(v: Variant) -> int:
        if v.backend == "sdpa":
            return {(False, False): 0, (True, False): 1, (True, True): 2, (False, True): 5}[(v.compiled, v.fp8)]
        return {(True, False): 3, (True, True): 4, (False, False): 6, (False, True): 7}[(v.compiled, v.fp8)]

    variants = [Variant(b, c, f) for b in backends for c in compiles for f in fp8s]
    return sorted(variants, key=lambda v: (tier(v), backends.index(v.backend)))


class SkipVariant(Exception):
    """The variant cannot run here (not a failure of the code under test); the message says why."""


def token_stream(steps: int, batch: int, seq: int, vocab: int, seed: int) -> torch.Tensor:
    """(steps, batch, seq + 1) token ids: even positions uniform, odd positions a fixed permutation of the token
    before. The same for every variant; learnable, so losses move apart if a variant computes something else."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (steps, batch, seq + 1), generator=gen)
    permutation = torch.randperm(vocab, generator=gen)
    follow = tokens[..., 0:-1:2]
    tokens[..., 1::2] = permutation[follow[..., : tokens[..., 1::2].shape[-1]]]
    return tokens


@dataclass
class Setup:
    args: argparse.Namespace
    device: torch.device
    config: NanoChatConfig
    initial_state: dict[str, torch.Tensor]
    tokens: torch.Tensor  # (steps, batch, seq + 1) on the device
    flops_per_token: float
    params: int
    peak_flops: float | None
    fp8_reason: str | None
    deadline: float  # monotonic time after which no variant starts
    micro_batch: dict[bool, int]  # per compiled flag: the largest micro-batch known to fit


def autocast(setup: Setup) -> contextlib.AbstractContextManager:
    # What accelerate's mixed_precision="bf16" (TrainingArguments(bf16=True)) does: autocast around the forward,
    # parameters and optimizer state stay fp32.
    if setup.args.precision == "bf16":
        return torch.autocast(setup.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    torch._dynamo.reset()  # compiled graphs hold their own references and cached code
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_model(setup: Setup, backend: str) -> NanoChatForCausalLM:
    """A fresh model with the shared initial weights and `backend` attention."""
    config = copy.deepcopy(setup.config)  # set_attn_implementation writes to the config; keep the shared one clean
    with setup.device:
        model = NanoChatForCausalLM(config)
    model.load_state_dict(setup.initial_state)
    if backend != model.config._attn_implementation:
        try:
            model.set_attn_implementation(backend)
        except (ValueError, ImportError) as e:  # transformers' way of saying the model or machine lacks it
            raise SkipVariant(f"set_attn_implementation: {first_line(e)}") from None
        if model.config._attn_implementation != backend:
            raise SkipVariant(f"transformers kept attention {model.config._attn_implementation!r}")
    return model.train()


def train_variant(setup: Setup, variant: Variant, micro_batch: int) -> dict:
    """`--steps` optimizer steps of one variant; per-step times (GPU synchronised) and losses."""
    args, device = setup.args, setup.device
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.monotonic()
    model = build_model(setup, variant.backend)
    if variant.fp8:
        from nanochat_hf.training.fp8 import convert_to_fp8

        convert_to_fp8(model, recipe="tensorwise")  # before compile, which must trace the fp8 modules
    optimizer = MuonAdamW(nanochat_param_groups(model))
    # nanochat compiles the whole model with static shapes; the loss is inside its forward (labels are passed)
    step_model = torch.compile(model, dynamic=False, backend=args.compile_backend) if variant.compiled else model
    accum = args.batch // micro_batch
    times, losses = [], []
    # A variant that started in time but runs long (a slow compile) stops early rather than take the whole call
    # past the machine's limit; the rows before it are already printed and saved.
    hard_stop = _START + args.budget_s + OVERRUN_S
    for step in range(args.steps):
        if time.monotonic() > hard_stop and step > args.skip + 1:
            break
        sync(device)
        t0 = time.perf_counter()
        total = torch.zeros((), device=device)
        for micro in range(accum):
            rows = setup.tokens[step, micro * micro_batch : (micro + 1) * micro_batch]
            inputs, labels = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
            with autocast(setup):
                # as PretrainTrainer.compute_loss: labels already aligned with input_ids, passed as shift_labels
                loss = step_model(input_ids=inputs, labels=labels, shift_labels=labels).loss
            (loss / accum).backward()
            total += loss.detach() / accum
        optimizer.step()
        model.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(total.item())
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"step_times_s": times, "losses": losses, "peak_memory_gib": peak, "wall_s": time.monotonic() - started}


def run_variant(setup: Setup, variant: Variant) -> dict:
    """One row of the table: train the variant at the largest micro-batch that fits (halving on out-of-memory)."""
    args = setup.args
    row = {"name": variant.name(args.precision), "attention": variant.backend,
           "compile": "on" if variant.compiled else "off", "precision": "fp8" if variant.fp8 else args.precision,
           "status": "ok", "reason": None}
    micro_batch = setup.micro_batch[variant.compiled]
    notes = []
    started = time.monotonic()
    while True:
        try:
            measured = train_variant(setup, variant, micro_batch)
            break
        except SkipVariant as e:
            status, reason = "skipped", str(e)
        except Exception as e:
            status = "oom" if is_out_of_memory(e) else "error"
            reason = f"{type(e).__name__}: {first_line(e)}"
            row["traceback"] = traceback.format_exc(limit=-12)  # in the JSON, for whoever fixes it
        # Freed here, after the except clause: its traceback held the frames, and with them the model's tensors.
        free_memory(setup.device)
        if status != "oom":
            row.update(status=status, reason=reason)
            return row
        row.pop("traceback", None)
        smaller = [d for d in range(1, micro_batch // 2 + 1) if args.batch % d == 0]
        if not smaller:
            row.update(status="error", reason=f"out of memory even at micro-batch {micro_batch}")
            return row
        notes.append(f"OOM at micro-batch {micro_batch}")
        micro_batch = smaller[-1]
        if time.monotonic() > setup.deadline:
            row.update(status="skipped", reason="budget (after " + ", ".join(notes) + ")")
            return row
    free_memory(setup.device)
    setup.micro_batch[variant.compiled] = micro_batch  # later variants of the same kind start where this one fit
    times = measured["step_times_s"][args.skip :]
    median = statistics.median(times)
    tokens_per_s = args.batch * args.seq / median
    steps_done = len(measured["losses"])
    if steps_done < args.steps:
        notes.append(f"stopped after {steps_done} steps (budget)")
    loss_index = min(args.loss_step, steps_done) - 1
    row.update(
        micro_batch=micro_batch,
        grad_accum=args.batch // micro_batch,
        tokens_per_s=tokens_per_s,
        mfu=tokens_per_s * setup.flops_per_token / setup.peak_flops if setup.peak_flops else None,
        peak_memory_gib=measured["peak_memory_gib"],
        first_step_s=measured["step_times_s"][0],
        median_step_s=median,
        loss_step=loss_index + 1,
        loss=measured["losses"][loss_index],
        losses=measured["losses"],
        step_times_s=measured["step_times_s"],
        wall_s=time.monotonic() - started,
        note="; ".join(notes) or None,
    )
    if not all(math.isfinite(x) for x in measured["losses"]):
        row.update(status="error", reason="non-finite loss")
    return row


def skip_reason(setup: Setup, variant: Variant, walls: dict[bool, float]) -> str | None:
    """Why `variant` is not run (its backend, fp8, the smoke profile or the budget), or None."""
    args = setup.args
    reason = backend_unavailable(variant.backend, setup.device)
    if reason:
        return reason
    if variant.fp8 and setup.fp8_reason:
        return "fp8 unsupported here (the reason is on the model line above and in the JSON)"
    if args.smoke and variant.compiled and variant.backend != "sdpa":
        return "--smoke compiles sdpa only"
    guess = walls.get(variant.compiled, args.compiled_guess_s if variant.compiled else args.eager_guess_s)
    if time.monotonic() + guess > setup.deadline:
        return f"budget (about {guess:.0f} s needed, {max(0.0, setup.deadline - time.monotonic()):.0f} s left)"
    return None


def prepare(args: argparse.Namespace, device: torch.device) -> Setup:
    overrides = {"max_position_embeddings": args.seq}
    if args.vocab_size:
        overrides["vocab_size"] = args.vocab_size
    config = NanoChatConfig.from_depth(args.depth, "2026", head_dim=args.head_dim, **overrides)
    torch.manual_seed(args.seed)
    with device:
        model = NanoChatForCausalLM(config)
    # One set of initial weights, kept on the host, loaded into every variant's model.
    initial_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    flops = model.estimate_flops_per_token(args.seq)
    params = model.num_parameters()
    del model
    free_memory(device)
    tokens = token_stream(args.steps, args.batch, args.seq, config.vocab_size, args.seed).to(device)
    deadline = _START + args.budget_s - (0.0 if args.no_decode else args.decode_reserve_s)
    return Setup(args, device, config, initial_state, tokens, flops, params, peak_flops(device),
                 fp8_unavailable(device), deadline, {False: args.batch, True: args.batch})


# ---------------------------------------------------------------------------------------------------------------
# decode: Engine against model.generate


class FirstTokenClock(BaseStreamer):
    """Notes when `generate` hands over its first new token (its first `put` is the prompt)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            sync(self.device)  # the token exists once the GPU has computed it
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def time_generate(model, prompt: list[int], batch: int, new_tokens: int, device: torch.device):
    ids = torch.tensor([prompt] * batch, device=device)
    clock = FirstTokenClock(device)
    sync(device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         streamer=clock, eos_token_id=None, pad_token_id=0)
    sync(device)
    total = time.perf_counter() - start
    return clock.first_token_at - start, total, out[0, len(prompt) :].tolist()


def time_engine(engine, prompt: list[int], batch: int, new_tokens: int, device: torch.device):
    sync(device)
    start = time.perf_counter()
    first, row0 = None, []
    for column, _ in engine.generate(prompt, num_samples=batch, max_tokens=new_tokens, temperature=0.0):
        if first is None:
            first = time.perf_counter()  # `column` is a list: the engine synchronised to build it
        row0.append(column[0])
    return first - start, time.perf_counter() - start, row0


def bench_decode(setup: Setup) -> dict:
    args, device = setup.args, setup.device
    try:
        from nanochat_hf.inference.engine import Engine
        from nanochat_hf.tokenizer.bpe import SPECIAL_TOKENS, tokenizer_from_merges
    except ImportError as e:
        return {"status": "skipped", "reason": f"engine not importable ({first_line(e)})"}
    if args.prompt_tokens + args.new_tokens > setup.config.max_position_embeddings:
        return {"status": "skipped", "reason": "--prompt-tokens + --new-tokens exceed the model's context"}
    # A byte-level tokenizer gives the engine nanochat's special ids; random weights: the work per token is what
    # matters, and nanochat's zero-initialised projections would make every layer trivial.
    tokenizer = tokenizer_from_merges({bytes([b]): b for b in range(256)}, [])
    special = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    config = copy.deepcopy(setup.config)
    config.bos_token_id = special["<|bos|>"]
    torch.manual_seed(args.seed)
    with device:
        model = NanoChatForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)  # inference in the dtype a served model would use
    engine = Engine(model, tokenizer)
    engine.stop_ids = frozenset()  # exactly --new-tokens per row, like generate(eos_token_id=None)
    gen = torch.Generator().manual_seed(args.seed)
    prompt = [special["<|bos|>"]] + torch.randint(0, 256, (args.prompt_tokens - 1,), generator=gen).tolist()
    rows = []
    with torch.inference_mode():
        for batch in args.decode_batches:
            time_generate(model, prompt, batch, 8, device)  # warm-up: kernels, allocator, first-call costs
            time_engine(engine, prompt, batch, 8, device)
            runs: dict[str, list[dict]] = {"engine": [], "generate": []}
            same = True
            for round_ in range(args.decode_rounds):
                # alternate who goes first, so a drift in machine state does not favour either side
                order = ("generate", "engine") if round_ % 2 == 0 else ("engine", "generate")
                tokens = {}
                for name in order:
                    timer = time_generate if name == "generate" else time_engine
                    ttft, total, tokens[name] = timer(model if name == "generate" else engine, prompt, batch,
                                                      args.new_tokens, device)
                    runs[name].append({"ttft_s": ttft, "decode_tokens_per_s": batch * (args.new_tokens - 1) /
                                       max(total - ttft, 1e-9)})
                same = same and tokens["generate"] == tokens["engine"]
            row = {"batch": batch, "same_tokens": same}
            for name, measured in runs.items():
                row[name] = {m: statistics.median(r[m] for r in measured) for m in measured[0]}
            row["ratio"] = row["engine"]["decode_tokens_per_s"] / row["generate"]["decode_tokens_per_s"]
            rows.append(row)
            print(decode_line(row), flush=True)
    del engine, model
    free_memory(device)
    return {"status": "ok", "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "dtype": "bf16" if args.precision == "bf16" else "fp32", "rows": rows}


# ---------------------------------------------------------------------------------------------------------------
# the table


COLUMNS = ("variant", "status", "batch", "tokens/s", "MFU", "peak GiB", "loss", "Δloss", "1st step s", "note")
WIDTHS = (42, 7, 8, 11, 6, 8, 8, 8, 10, 0)


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def table_header() -> str:
    line = " ".join(c.ljust(w) if i in (0, 1, 9) else c.rjust(w) for i, (c, w) in enumerate(zip(COLUMNS, WIDTHS,
                                                                                                  strict=True)))
    return line.rstrip() + "\n" + "-" * (sum(WIDTHS) + len(WIDTHS) + 20)


def table_row(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['name']:<42} {row['status']:<7} {row['reason']}"
    batch = f"{row['micro_batch']}x{row['grad_accum']}"
    cells = (
        row["name"].ljust(42), "ok".ljust(7), batch.rjust(8), fmt(row["tokens_per_s"], ",.0f").rjust(11),
        fmt(row["mfu"] and 100 * row["mfu"], ".1f").rjust(5) + ("%" if row["mfu"] else " "),
        fmt(row["peak_memory_gib"], ".1f").rjust(8), fmt(row["loss"], ".4f").rjust(8),
        fmt(row.get("loss_delta"), "+.4f").rjust(8), fmt(row["first_step_s"], ".1f").rjust(10), row["note"] or "",
    )
    return " ".join(cells).rstrip()


def decode_line(row: dict) -> str:
    e, g = row["engine"], row["generate"]
    return (f"decode batch {row['batch']}: Engine {e['decode_tokens_per_s']:,.1f} tok/s "
            f"(TTFT {e['ttft_s'] * 1e3:.1f} ms) | generate {g['decode_tokens_per_s']:,.1f} tok/s "
            f"(TTFT {g['ttft_s'] * 1e3:.1f} ms) | Engine/generate {row['ratio']:.2f}x | same tokens: {row['same_tokens']}")


def verdicts(rows: list[dict], precision: str, has_peak: bool) -> dict:
    """The two targets: best bf16 MFU, and fp8 over bf16 tokens/s for the same backend and compile mode."""
    ok = [r for r in rows if r["status"] == "ok"]
    plain = [r for r in ok if r["precision"] == precision]
    best = max(plain, key=lambda r: r["tokens_per_s"], default=None)
    result = {"best": best and best["name"], "best_mfu": best and best["mfu"], "mfu_target": MFU_TARGET,
              "mfu_met": (best["mfu"] >= MFU_TARGET) if best and best["mfu"] is not None else None}
    pairs = {}
    for r in ok:
        if r["precision"] == "fp8":
            twin = next((p for p in plain if (p["attention"], p["compile"]) == (r["attention"], r["compile"])), None)
            if twin:
                pairs[f"{r['attention']}/{'compile' if r['compile'] == 'on' else 'eager'}"] = (
                    r["tokens_per_s"] / twin["tokens_per_s"])
    best_fp8 = max((r for r in ok if r["precision"] == "fp8"), key=lambda r: r["tokens_per_s"], default=None)
    result.update(fp8_speedups=pairs, fp8_target=FP8_TARGET,
                  fp8_best_over_bf16_best=best_fp8 and best and best_fp8["tokens_per_s"] / best["tokens_per_s"],
                  fp8_met=max(pairs.values()) >= FP8_TARGET if pairs else None)
    if not has_peak:
        result["mfu_met"] = None
    return result


def print_summary(result: dict) -> None:
    rows = result["variants"]
    print("\n" + result["title"])
    print(table_header())
    for row in rows:
        print(table_row(row))
    v = result["verdicts"]

    def met(flag: bool | None) -> str:
        return "n/a" if flag is None else ("met" if flag else "MISSED")

    mfu = f"{100 * v['best_mfu']:.1f}%" if v["best_mfu"] is not None else "-"
    print(f"\nbest {result['precision']} variant: {v['best'] or '-'}, MFU {mfu} (target >= {100 * MFU_TARGET:.0f}%: "
          f"{met(v['mfu_met'])})")
    speedups = ", ".join(f"{k} {x:.2f}x" for k, x in v["fp8_speedups"].items()) or "-"
    print(f"fp8 / {result['precision']} tokens/s: {speedups} (target >= {FP8_TARGET}x: {met(v['fp8_met'])}); "
          f"best fp8 / best {result['precision']}: {fmt(v['fp8_best_over_bf16_best'], '.2f')}")
    decode = result["decode"]
    if decode.get("status") == "ok":
        print(f"decode ({decode['dtype']}, prompt {decode['prompt_tokens']}, {decode['new_tokens']} new tokens):")
        for row in decode["rows"]:
            print("  " + decode_line(row))
    else:
        print(f"decode: {decode.get('status')}: {decode.get('reason')}")
    print(f"total {result['wall_s']:.0f} s (budget {result['budget_s']:.0f} s)")


# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: tests this script's logic")
    g = parser.add_argument_group("model and run (defaults: d20 on GPU; see --smoke)")
    g.add_argument("--depth", type=int)
    g.add_argument("--head-dim", type=int)
    g.add_argument("--vocab-size", type=int)
    g.add_argument("--seq", type=int, help="T, tokens per row (also the model's context)")
    g.add_argument("--batch", type=int, help="rows per optimizer step (nanochat's d20 device batch: 32 on 80 GB)")
    g.add_argument("--steps", type=int, help="optimizer steps per variant")
    g.add_argument("--skip", type=int, help="first steps left out of the median (compile, autotuning)")
    g.add_argument("--loss-step", type=int, default=10, help="the step whose loss is compared across variants")
    g.add_argument("--precision", choices=["bf16", "fp32"], help="bf16 autocast with fp32 weights, or plain fp32")
    g.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("variants")
    g.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated attention backends")
    g.add_argument("--compile", choices=["off", "on", "both"], default="both")
    g.add_argument("--fp8", choices=["off", "on", "both"], default="both")
    g.add_argument("--compile-backend", help="torch.compile backend (inductor; --smoke uses aot_eager)")
    g.add_argument("--budget-s", type=float, help="no variant starts that would end after this (from start-up)")
    g.add_argument("--decode-reserve-s", type=float, help="seconds of the budget kept for the decode benchmark")
    g.add_argument("--eager-guess-s", type=float, help="time assumed for an eager variant until one is measured")
    g.add_argument("--compiled-guess-s", type=float, help="likewise for a compiled variant")
    g = parser.add_argument_group("decode")
    g.add_argument("--no-decode", action="store_true")
    g.add_argument("--decode-batches", default="1,8")
    g.add_argument("--prompt-tokens", type=int)
    g.add_argument("--new-tokens", type=int)
    g.add_argument("--decode-rounds", type=int)
    parser.add_argument("--json", help="also write the result here ($OUT/gpu_check.json is written when OUT is set)")
    args = parser.parse_args(argv)
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.decode_batches = [int(b) for b in args.decode_batches.split(",")]
    if not 0 <= args.skip < args.steps:
        parser.error("--skip must be at least 0 and below --steps")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("no CUDA device: the full check needs a GPU (run --smoke to test the script on CPU)")
    env = machine(device)
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items() if v is not None), flush=True)

    setup = prepare(args, device)
    shape = (f"2026 generation, depth {args.depth}, {setup.config.hidden_size} wide, head_dim {setup.config.head_dim},"
             f" vocab {setup.config.vocab_size}, T={args.seq}, {args.batch} rows/step ({args.batch * args.seq:,} "
             f"tokens), {setup.params:,} params, {setup.flops_per_token:.4g} FLOPs/token, {args.steps} steps "
             f"(median of steps {args.skip + 1}..{args.steps}), {args.precision}"
             f"{' autocast' if args.precision == 'bf16' else ''}, MuonAdamW")
    peak = f"peak {setup.peak_flops:.4g} FLOP/s (bf16)" if setup.peak_flops else "no MFU (GPU not in the peak table)"
    print(f"model: {shape}; {peak}; fp8: {setup.fp8_reason or 'supported'}", flush=True)
    print(f"loss column: step {min(args.loss_step, args.steps)}; Δloss against the first variant that ran "
          f"(sdpa/eager/{args.precision} when it did)\n", flush=True)
    print(table_header(), flush=True)

    variants = plan_variants(args.backends, {"off": [False], "on": [True], "both": [False, True]}[args.compile],
                             {"off": [False], "on": [True], "both": [False, True]}[args.fp8])
    rows: list[dict] = []
    result = {
        "benchmark": "gpu_check",
        "title": f"GPU check on {env['device']}: {shape}",
        "complete": False,  # saved after every row, so a run cut off by the machine's limit still leaves its rows
        "machine": env,
        "smoke": args.smoke,
        "precision": args.precision,
        "config": setup.config.to_dict(),
        "flops_per_token": setup.flops_per_token,
        "peak_flops": setup.peak_flops,
        "fp8_unsupported": setup.fp8_reason,
        "compile_backend": args.compile_backend,
        "baseline": None,
        "variants": rows,
        "decode": {"status": "not run yet"},
        "budget_s": args.budget_s,
    }
    paths = [args.json] if args.json else []
    if os.environ.get("OUT"):
        paths.append(os.path.join(os.environ["OUT"], "gpu_check.json"))

    def save() -> None:
        result["wall_s"] = time.monotonic() - _START
        for path in paths:
            with open(path, "w") as f:
                json.dump(result, f, indent=2, default=str)

    baseline = None
    walls: dict[bool, float] = {}  # longest wall time measured so far, per compiled flag: the next one's estimate
    for variant in variants:
        reason = skip_reason(setup, variant, walls)
        if reason:
            row = {"name": variant.name(args.precision), "attention": variant.backend,
                   "compile": "on" if variant.compiled else "off",
                   "precision": "fp8" if variant.fp8 else args.precision, "status": "skipped", "reason": reason}
        else:
            row = run_variant(setup, variant)
            if "wall_s" in row:
                walls[variant.compiled] = max(walls.get(variant.compiled, 0.0), row["wall_s"])
        if baseline is None and row["status"] == "ok":
            baseline = row
            result["baseline"] = row["name"]
        if baseline is not None and row["status"] == "ok" and row["loss_step"] == baseline["loss_step"]:
            row["loss_delta"] = row["loss"] - baseline["loss"]
        rows.append(row)
        print(table_row(row), flush=True)
        save()

    if args.no_decode:
        decode = {"status": "skipped", "reason": "--no-decode"}
    elif time.monotonic() > _START + args.budget_s:
        decode = {"status": "skipped", "reason": "budget"}
    else:
        print(flush=True)
        try:
            decode = bench_decode(setup)
        except Exception as e:
            decode = {"status": "error", "reason": f"{type(e).__name__}: {first_line(e)}",
                      "traceback": traceback.format_exc(limit=-12)}
        free_memory(device)
    result["decode"] = decode
    result["verdicts"] = verdicts(rows, args.precision, setup.peak_flops is not None)
    result["complete"] = True
    save()
    print_summary(result)
    for path in paths:
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
