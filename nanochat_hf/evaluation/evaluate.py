"""`nanochat-hf eval`: evaluate one checkpoint folder for its stage and write the results JSON.

* base: CORE (nanochat's 22 DCLM tasks from the eval bundle, our batched scorer -- the same verdict code the
  lighteval tasks in evals/core.py use) and bits per byte (evaluation/bpb.py's ``evaluate_bpb``) on the train and the
  validation split of ``--bpb-data``, as nanochat's base_eval: ``--bpb-tokens`` (40 x 524,288) on each, rounded down
  to whole batches, in the compute dtype (bf16 on a GPU that has it, else fp32).
* mid / sft / rl: the chat evaluations through the runners in ``evaluation.chat.HUB_CHAT_EVALS`` (see below); ChatCORE and
  ChatCORE_cat over the tasks evaluation/chatcore.py lists (SpellingBee is reported beside them); and the
  chat-format metrics (``ends_turn_rate``, ``calculator_rate``) over the generated replies.

``--tier cpu`` runs offline: the chat stages evaluate the project's own generators (``evaluation.chat.CPU_TIER_EVALS``: arithmetic
with the calculator, spelling) instead of the Hub tasks, and the base stage scores CORE only when an eval bundle is
at hand (``--bundle``, ``$NANOCHAT_EVAL_BUNDLE`` or the cache), else bits per byte alone. Any other tier (default
d20) evaluates nanochat's Hub tasks.

``--max-per-task N`` is nanochat's max_per_task (the first N items of each task after its fixed shuffle), so the
CPU tier evaluates in seconds. Results go to ``<model>/eval_<stage>.json`` unless ``--output`` says otherwise.

Each task (and each bits-per-byte split) shows a progress bar on stderr with its count and ETA. Data that cannot be
had (offline, or not in ``--data-dir``) is named before the model loads: one line listing every missing dataset and
the flag that points at a local copy (``--bundle`` for CORE's bundle, ``--data-dir`` for the chat tasks).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import check_source, run_command
from .bundle import BUNDLE_ENV, cache_dir, resolve_bundle
from .chatcore import CATEGORICAL_TASKS, CHATCORE, CHATCORE_CAT, CHATCORE_TASKS, chatcore, chatcore_cat
from .core import evaluate_core
from .progress import task_bar

__all__ = ["CATEGORICAL_TASKS", "CHATCORE_TASKS", "chatcore", "chatcore_cat", "evaluate_checkpoint", "main"]

STAGES = ("base", "mid", "sft", "rl")
TIERS = ("cpu", "d12", "d20", "d24", "d26", "d32")  # as nanochat_hf.tasks.mixtures.TIERS (imported lazily there)
# Chat-stage evaluators, name -> fn(model, tokenizer, max_per_task=..., batch_size=..., data_dir=..., max_tokens=...)
# -> {"accuracy": float, ...}. The chat evals (nanochat_hf/evaluation/chat.py) register here: nanochat's Hub tasks,
# and the CPU tier's offline tasks. ChatCORE reads the accuracies of the tasks it lists by name.
# nanochat HEAD's base_eval --split-tokens: bits per byte over this many tokens of each split
BPB_TOKENS = 40 * 524288


def _resolve_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":  # nanochat's COMPUTE_DTYPE: bf16 where the GPU has bf16 tensor cores (SM 8.0+), else fp32
        cuda_bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
        return torch.bfloat16 if cuda_bf16 else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"--dtype {dtype!r}: use auto, float32, bfloat16 or float16") from None


def bpb_batches(tokens: int, batch_size: int, seq_len: int) -> int:
    """Whole batches in a budget of `tokens`, rounded down as nanochat's base_eval rounds --split-tokens."""
    per_batch = batch_size * seq_len
    if tokens < per_batch:
        raise ValueError(f"--bpb-tokens {tokens} is less than one batch ({batch_size} x {seq_len} = {per_batch} "
                         "tokens): raise --bpb-tokens or lower --batch-size")
    return tokens // per_batch


def base_bpb(model, tokenizer, data: str, tokens: int = BPB_TOKENS, batch_size: int = 8,
             progress: bool = False) -> dict:
    """nanochat's base_eval bits per byte: up to the same number of tokens (see bpb_batches) from the start of
    `data`'s train split and of its validation split, at the model's context length, in the model's dtype.
    ``tokens_read`` says how many each split gave: a validation split shorter than the budget is read once.
    `progress` shows a bar per split on stderr."""
    from ..data.pretrain import PretrainStream
    from ..tokenizer.bpe import token_bytes
    from .bpb import evaluate_bpb

    seq_len = model.config.max_position_embeddings
    batches = bpb_batches(tokens, batch_size, seq_len)
    result, read = {}, {}
    for split in ("train", "val"):
        stream = PretrainStream(data, tokenizer, batch_size=batch_size, seq_len=seq_len, split=split,
                                num_workers=0, max_batches=batches)
        read[split] = 0

        def counted(bar, stream=stream, split=split):
            for batch in stream:
                read[split] += batch["input_ids"].numel()
                yield batch
                bar.update(1)
            bar.total = bar.n  # a split shorter than the budget ends early: the bar ends at what it had

        with task_bar(f"bits per byte ({split})" if progress else None, batches, unit="batch") as bar:
            result[f"{split}_bpb"] = evaluate_bpb(model, counted(bar=bar), token_bytes(tokenizer))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {**result, "tokens": batches * batch_size * seq_len, "tokens_read": read, "dtype": dtype, "data": data}


def _chat_results(model, tokenizer, max_per_task: int, batch_size: int, tier: str = "d20",
                  data_dir: str | None = None, max_tokens: int | None = None) -> dict:
    from . import chat  # the tasks and the engine load only for the chat stages

    evals = chat.CPU_TIER_EVALS if tier == "cpu" else chat.HUB_CHAT_EVALS
    results = {}
    for name, run in evals.items():
        results[name] = run(model, tokenizer, max_per_task=max_per_task, batch_size=batch_size, data_dir=data_dir,
                            max_tokens=max_tokens, desc=name)
    accuracies = {name: r["accuracy"] for name, r in results.items()}
    # None where a task of theirs was not evaluated (the CPU tier evaluates none of them)
    return {"tasks": results, "chatcore": chatcore(accuracies), "chatcore_cat": chatcore_cat(accuracies),
            "format": chat.format_metrics(results)}


def local_bundle_available(bundle: str | None) -> bool:
    """Whether CORE can run without a download: a bundle named, in $NANOCHAT_EVAL_BUNDLE, or already cached."""
    cached = cache_dir() / "eval_bundle"
    return bool(bundle or os.environ.get(BUNDLE_ENV)) or any(
        (p / "core.yaml").is_file() for p in (cached, cached / "eval_bundle"))


def default_output(model_dir: str, stage: str) -> Path:
    path = Path(model_dir).expanduser()
    return (path if path.is_dir() else Path.cwd()) / f"eval_{stage}.json"


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)  # never a half-written results file


def evaluate_checkpoint(
    model_dir: str,
    stage: str = "base",
    *,
    bundle: str | None = None,
    max_per_task: int = -1,
    batch_size: int = 8,
    core_tasks: list[str] | None = None,
    bpb_data: str | None = None,
    bpb_tokens: int = BPB_TOKENS,
    device: str | None = None,
    dtype: str = "auto",
    output: str | os.PathLike | None = None,
    tier: str = "d20",
    data_dir: str | None = None,
    max_tokens: int | None = None,
) -> dict:
    """Evaluate the checkpoint `model_dir` (folder or Hub repo id) for `stage`; write and return the results.

    base: CORE (+ bits per byte on `bpb_data`'s train and validation splits when given); mid/sft/rl: chat evals,
    ChatCORE and ChatCORE_cat.
    `tier` "cpu" evaluates offline (see the module docstring); `data_dir` holds local copies of the Hub tasks
    (`<data_dir>/<owner>/<name>`); `max_tokens` caps each generated reply (default 512, CPU tier 256)."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: use one of {', '.join(STAGES)}")
    if tier not in TIERS:
        raise ValueError(f"tier {tier!r}: use one of {', '.join(TIERS)}")
    if stage == "base" and tier == "cpu" and bpb_data is None and not local_bundle_available(bundle):
        raise ValueError("--tier cpu, base stage: no eval bundle at hand for CORE and no --bpb-data for bits per "
                         f"byte; pass --bpb-data (a text folder), or --bundle / ${BUNDLE_ENV} for CORE")
    check_source(str(model_dir), "--model")
    path = Path(model_dir).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no config.json); pass a save_pretrained folder")
    run_core = stage == "base" and (tier != "cpu" or local_bundle_available(bundle))  # cpu never downloads it
    # Data that cannot be had is named before the model loads, not after an hour of other tasks.
    if run_core:
        resolve_bundle(bundle)
    elif stage != "base" and tier != "cpu":
        from .chat import check_hub_data

        check_hub_data(data_dir)
    torch_device = _resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True,
                                                 dtype=_resolve_dtype(dtype, torch_device))
    model.to(torch_device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if stage == "base" and bpb_data is not None:
        bpb_batches(bpb_tokens, batch_size, model.config.max_position_embeddings)  # a bad budget fails before CORE
    started = time.perf_counter()
    results: dict = {"model": str(model_dir), "stage": stage, "tier": tier, "max_per_task": max_per_task}
    if stage == "base":
        if run_core:
            results["core"] = evaluate_core(model, tokenizer, bundle, max_per_task=max_per_task, tasks=core_tasks,
                                            batch_size=batch_size, progress=True)
        if bpb_data is not None:
            results["bpb"] = base_bpb(model, tokenizer, bpb_data, bpb_tokens, batch_size, progress=True)
    else:
        results["chat"] = _chat_results(model, tokenizer, max_per_task, batch_size, tier, data_dir, max_tokens)
    results["seconds"] = time.perf_counter() - started
    out = Path(output) if output is not None else default_output(model_dir, stage)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        _write_json(out, results)
    results["output"] = str(out)
    return results


@dataclass
class EvalArguments:
    """What `nanochat-hf eval` evaluates, and how. Each field is a flag (`--max_per_task` or `--max-per-task`) and
    can come from a recipe (`--config FILE` or `--config=FILE`), which the command line overrides."""

    model: str = field(metadata={"help": "checkpoint folder (save_pretrained) or Hub repo id"})
    stage: str = field(default="base", metadata={"choices": STAGES, "help": "the checkpoint's stage"})
    bundle: str | None = field(default=None, metadata={
        "help": "CORE eval bundle: eval_bundle/ folder or eval_bundle.zip (default: $NANOCHAT_EVAL_BUNDLE, else "
                "downloaded once into the cache)"})
    max_per_task: int = field(default=-1, metadata={"help": "items per task (-1 = all, as nanochat)"})
    tasks: str | None = field(default=None, metadata={
        "help": "comma-separated CORE task labels (default: all in the bundle)"})
    batch_size: int = field(default=8, metadata={"help": "examples per forward pass"})
    bpb_data: str | None = field(default=None, metadata={
        "help": "text dataset (Hub id or local folder) for bits per byte on its train and validation splits"})
    bpb_tokens: int = field(default=BPB_TOKENS, metadata={
        "help": "tokens of each split for bits per byte (40 x 524,288, nanochat's base_eval; rounded down to whole "
                "batches)"})
    tier: str = field(default="d20", metadata={
        "choices": TIERS, "help": "cpu: offline tasks from the project's generators (and CORE only with a local "
                                  "bundle); other tiers: nanochat's Hub tasks"})
    data_dir: str | None = field(default=None, metadata={
        "help": "local copies of the Hub chat tasks, <data-dir>/<owner>/<name> (as `hf download <repo> "
                "--repo-type dataset --local-dir` writes them)"})
    max_tokens: int | None = field(default=None, metadata={
        "help": "token budget of each generated reply (default 512, cpu 256)"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1 ... (default: cuda if available)"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16"})
    output: str | None = field(default=None, metadata={
        "help": "results JSON path (default: <model>/eval_<stage>.json)"})


_PROG = "nanochat-hf eval"
_DESCRIPTION = ("Evaluate a checkpoint for its stage (base: CORE + bits per byte; mid/sft/rl: chat evals + ChatCORE) "
                "and write the results JSON beside it.")


def build_parser():
    from ..training.arguments import StageParser  # the stages' parser: recipes, one line per bad input

    return StageParser(EvalArguments, prog=_PROG, description=_DESCRIPTION)


def parse_eval_args(argv: list[str] | None = None) -> EvalArguments:
    from ..training.arguments import parse_stage_args

    return parse_stage_args(argv, EvalArguments, prog=_PROG, description=_DESCRIPTION)


def main(argv: list[str] | None = None) -> None:
    args = parse_eval_args(argv)
    results = evaluate_checkpoint(
        args.model, args.stage, bundle=args.bundle, max_per_task=args.max_per_task, batch_size=args.batch_size,
        core_tasks=args.tasks.split(",") if args.tasks else None, bpb_data=args.bpb_data,
        bpb_tokens=args.bpb_tokens, device=args.device, dtype=args.dtype, output=args.output, tier=args.tier,
        data_dir=args.data_dir, max_tokens=args.max_tokens,
    )
    if "core" in results:
        for label, acc in results["core"]["results"].items():
            print(f"{label:<36} accuracy {acc:.4f}  centered {results['core']['centered_results'][label]:+.4f}")
        print(f"CORE metric: {results['core']['core_metric']:.4f}")
    if "bpb" in results:
        print(f"train bits per byte: {results['bpb']['train_bpb']:.4f}")
        print(f"validation bits per byte: {results['bpb']['val_bpb']:.4f}")
    if "chat" in results:
        for name, r in results["chat"]["tasks"].items():
            extra = "".join(f"  {k} {r[k]:.4f}" for k in ("ends_turn_rate", "calculator_rate") if k in r)
            print(f"{name:<16} accuracy {r['accuracy']:.4f}{extra}")
        for name, key, tasks in ((CHATCORE, "chatcore", CHATCORE_TASKS), (CHATCORE_CAT, "chatcore_cat",
                                                                         CATEGORICAL_TASKS)):
            value = results["chat"][key]
            print(f"{name}: {value:.4f}" if value is not None else f"{name}: not computed (it needs "
                  f"{', '.join(tasks)})")
        for key, value in results["chat"]["format"].items():
            if value is not None:
                print(f"{key}: {value:.4f}")
    print(f"results written to {results['output']}")


if __name__ == "__main__":  # `python -m nanochat_hf.evaluation.evaluate`: input errors as in the CLI
    run_command("eval", main)
