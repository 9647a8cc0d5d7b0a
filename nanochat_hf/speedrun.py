"""The speedrun: every stage of the pipeline, in order, into one run folder. Two pipelines, nanochat's two:

    2025: corpus -> tokenizer -> pretrain -> eval base -> midtrain -> eval mid -> SFT -> eval sft -> (RL) -> report
    2026: corpus -> tokenizer -> pretrain -> eval base -> SFT from the base model -> eval sft -> (RL) -> report

The 2026 pipeline is nanochat HEAD's (runs/speedrun.sh): no midtraining, SFT packed and warm-started from
pretraining's optimizer (recipes/<tier>/sft-2026.yaml). The GPU tiers default to it; the CPU tier keeps the 2025
pipeline (docs/benchmarks.md has the measurement behind that choice).

Each training or evaluation stage runs as its own process, exactly the command a user would type (under
`accelerate launch` on GPU tiers; `recipes/speedrun.sh TIER [PIPELINE]` spells them out), with its output tee'd into
`logs/<stage>.log`. A stage whose output exists is skipped on a re-run; an interrupted pretraining or midtraining
resumes from its last checkpoint. The run folder:

    corpus/ tokenizer/              the pretraining text (or a SOURCE file naming it) and the BPE
    train/<stage>/                  trainer output: checkpoints, losses.jsonl, bpb.jsonl
    base/ mid/ sft/ rl/             the models, each a save_pretrained folder with its eval_<stage>.json
    logs/<stage>.log                every stage's output
    speedrun.json                   tier, machine and per-stage timings (what the report reads)
    report.md, report/*.png         the report card
"""

import codecs
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .data.embedded import embedded_corpus, write_corpus_shards
from .data.sources import open_text_stream
from .evaluation.report import git_state, write_report
from .output_folder import check_run_folder
from .tokenizer.bpe import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
ACCELERATE_CONFIGS = ROOT / "accelerate_configs"


@dataclass(frozen=True)
class Tier:
    vocab_size: int
    tokenizer_max_chars: int | None = 2_000_000_000
    pretraining_text: str = "karpathy/climbmix-400b-shuffle"
    # items per eval task (nanochat's max_per_task); -1 = all
    eval_max_per_task: int = -1
    eval_bpb_tokens: int = 40 * 524288  # per split, as nanochat HEAD's base_eval --split-tokens
    gpu: bool = True
    pipeline: str = "2026"  # the default of --pipeline


TIERS: dict[str, Tier] = {
    # The embedded corpus (CPython's own docs), the project's own chat data, offline evaluations.
    "cpu": Tier(vocab_size=8192, tokenizer_max_chars=None, pretraining_text="embedded", eval_max_per_task=32,
                eval_bpb_tokens=65536, gpu=False, pipeline="2025"),
    "d12": Tier(vocab_size=32768),
    "d20": Tier(vocab_size=32768),
    # nanochat HEAD's runs/speedrun.sh: GPT-2's CORE in about 1.65 h on 8xH100 (FP8); 2026 pipeline only
    "d24": Tier(vocab_size=32768),
    "d26": Tier(vocab_size=32768),
    "d32": Tier(vocab_size=32768),
}

# model folder and evaluation stage of each training stage
MODELS = {"pretrain": "base", "midtrain": "mid", "sft": "sft", "rl": "rl"}
PIPELINES: dict[str, tuple[str, ...]] = {"2025": ("pretrain", "midtrain", "sft"), "2026": ("pretrain", "sft")}
# the recipe file of a stage, by pipeline, where it is not <stage>.yaml
RECIPE_FILES = {("2026", "sft"): "sft-2026.yaml"}


def recipe_file(tier: str, pipeline: str, stage: str) -> Path:
    return RECIPES / tier / RECIPE_FILES.get((pipeline, stage), f"{stage}.yaml")


class StageFailed(RuntimeError):
    """A stage's process exited with an error; its log says why."""


def launcher(tier: Tier, accelerate_config: str | None = None) -> list[str]:
    """The command prefix of the training stages: plain Python on CPU, `accelerate launch` on GPU tiers."""
    if accelerate_config is None and not tier.gpu:
        return [sys.executable, "-m"]
    if accelerate_config is None:
        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise ValueError("this tier trains on GPUs but none is visible; use --tier cpu, or pass "
                             "--accelerate-config accelerate_configs/cpu.yaml to run it on the CPU anyway")
        name = "single_gpu.yaml" if gpus == 1 else "ddp_8gpu.yaml"
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ACCELERATE_CONFIGS / name), "--num_processes", str(gpus), "-m"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config, "-m"]


def final_text(line: str) -> str:
    """What is left of `line` (no newline) once the carriage returns in it have done their work: the last segment
    that is not blank (a progress bar's final state, or the message printed over a cleared bar)."""
    segments = line.split("\r")
    return next((s for s in reversed(segments) if s.strip()), segments[-1])


def run_logged(command: list[str], log_path: Path, env: dict | None = None) -> None:
    """Run `command`, echoing its output and keeping a copy in `log_path`; raise StageFailed if it fails.

    The log gets every line as soon as the stage prints it (`tail -f` follows a stage), with what carriage returns
    overwrite left out: a progress bar leaves its final state, not one line per redraw. A terminal sees the raw
    stream, bars and all; anything else (a pipe, a file) sees the log's lines."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    live = sys.stdout.isatty()
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    pending = b""
    with open(log_path, "a", encoding="utf-8") as log:

        def emit(raw: bytes) -> None:
            text = raw.decode("utf-8", "replace").removesuffix("\r")
            if text and not text.strip() and "\r" in text:
                return  # only a cleared bar: nothing a reader would see
            line = final_text(text) + "\n"
            log.write(line)
            log.flush()
            if not live:
                sys.stdout.write(line)
                sys.stdout.flush()

        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        # unbuffered: a Python stage writes each line when it prints it, not when a pipe buffer fills
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        assert process.stdout is not None
        while chunk := process.stdout.read1(65536):
            if live:
                sys.stdout.write(decoder.decode(chunk))
                sys.stdout.flush()
            *lines, pending = (pending + chunk).split(b"\n")
            for raw in lines:
                emit(raw)
        if pending:
            emit(pending)
        code = process.wait()
    if code != 0:
        raise StageFailed(f"`{' '.join(command[-6:])}` exited with {code}; see {log_path}")


def run_speedrun(
    tier: str,
    run_dir: str | Path,
    corpus: str | None = None,
    max_steps: int | None = None,
    rl: bool = False,
    pipeline: str | None = None,
    accelerate_config: str | None = None,
    eval_max_per_task: int | None = None,
    eval_max_tokens: int | None = None,
) -> dict:
    """Run every stage of `tier` into `run_dir`; returns the speedrun log (also written to speedrun.json).

    `corpus` replaces the tier's pretraining text (a folder of parquet/jsonl/txt files or a Hub id); `max_steps`
    caps every training stage and `eval_max_per_task` / `eval_max_tokens` the evaluations (a smoke run); `rl` adds
    the GRPO stage; `pipeline` ("2025" or "2026"; default: the tier's) chooses the stages.
    """
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
    if not (RECIPES / tier / "pretrain.yaml").exists():
        raise FileNotFoundError(f"{RECIPES / tier} not found: run the speedrun from a checkout of nanochat-hf")
    spec = TIERS[tier]
    pipeline = spec.pipeline if pipeline is None else pipeline
    if pipeline not in PIPELINES:
        raise ValueError(f"--pipeline {pipeline!r}: use 2025 (midtraining, then SFT) or 2026 (nanochat HEAD's: SFT "
                         "from the base model)")
    stages = PIPELINES[pipeline] + (("rl",) if rl else ())
    missing = [recipe_file(tier, pipeline, name).name for name in stages if not recipe_file(tier, pipeline, name).exists()]
    if missing:
        other = next(p for p in PIPELINES if p != pipeline)
        raise ValueError(f"--pipeline {pipeline}: recipes/{tier} has no {', '.join(missing)}; tier {tier} runs "
                         f"--pipeline {other}")
    prefix = launcher(spec, accelerate_config)
    # an earlier run in run_dir is continued (finished stages skipped); a folder holding anything else is refused
    run_dir = check_run_folder(Path(run_dir).resolve(), inputs=[corpus], flag="--run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    log_file = run_dir / "speedrun.json"
    log: dict = json.loads(log_file.read_text()) if log_file.exists() else {}
    if log.get("pipeline", pipeline) != pipeline:
        raise ValueError(f"{run_dir} holds a speedrun of --pipeline {log['pipeline']}; continue it with that "
                         "pipeline, or pass another --run-dir")
    log.update(tier=tier, pipeline=pipeline, spec=asdict(spec), device="cuda" if torch.cuda.is_available() else "cpu",
               gpus=torch.cuda.device_count(), python=platform.python_version())
    log.setdefault("started", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    log.setdefault("git", git_state(ROOT))  # the code the run started with, not the checkout at report time
    stages_log = log.setdefault("stages", {})
    log_file.write_text(json.dumps(log, indent=2))  # marks the folder as a run from the start, never left empty
    corpus_dir, tokenizer_dir = run_dir / "corpus", run_dir / "tokenizer"
    per_task = spec.eval_max_per_task if eval_max_per_task is None else eval_max_per_task
    env = {"TOKENIZERS_PARALLELISM": "false"}

    def stage(name: str, output: Path, fn: Callable[[], None]) -> None:
        if output.exists():
            print(f"[speedrun] {name}: done already ({output}), skipping", flush=True)
            stages_log.setdefault(name, {})["skipped"] = True
            return
        print(f"[speedrun] {name} ...", flush=True)
        start = time.perf_counter()
        fn()
        stages_log[name] = {"seconds": round(time.perf_counter() - start, 2), "log": f"logs/{name}.log"}
        log_file.write_text(json.dumps(log, indent=2))
        print(f"[speedrun] {name}: {stages_log[name]['seconds']} s -> {output}", flush=True)

    def data_source() -> str:
        source = corpus_dir / "SOURCE"
        return source.read_text() if source.exists() else str(corpus_dir)

    def corpus_stage() -> None:
        if corpus is not None:  # a given corpus is read where it is
            corpus_dir.mkdir()
            (corpus_dir / "SOURCE").write_text(corpus if not Path(corpus).exists() else str(Path(corpus).resolve()))
        elif spec.pretraining_text == "embedded":
            write_corpus_shards(corpus_dir)
        else:
            corpus_dir.mkdir()
            (corpus_dir / "SOURCE").write_text(spec.pretraining_text)

    def tokenizer_stage() -> None:
        source = data_source()
        if source == str(corpus_dir):
            texts = embedded_corpus()
        else:
            texts = (row["text"] for row in open_text_stream(source, split="train"))
        tokenizer = train_tokenizer(texts, vocab_size=spec.vocab_size, max_chars=spec.tokenizer_max_chars)
        staging = tokenizer_dir.with_name(tokenizer_dir.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        tokenizer.save_pretrained(staging)
        staging.rename(tokenizer_dir)

    def training_stage(name: str, init_from: Path | None) -> Callable[[], None]:
        def run() -> None:
            work = run_dir / "train" / name
            argv = ["--config", str(recipe_file(tier, pipeline, name)), "--output_dir", str(work)]
            if name == "pretrain":
                argv += ["--tokenizer", str(tokenizer_dir), "--dataset", data_source()]
            else:
                argv += ["--init_from", str(init_from)]
            if name in ("pretrain", "midtrain"):
                argv += ["--resume", "true"]
            if max_steps is not None:
                argv += ["--num_iterations", str(max_steps)]
                if name != "rl":
                    argv += ["--eval_every", str(max_steps)]
                if name in ("pretrain", "midtrain"):
                    argv += ["--save_every", str(max_steps)]
            run_logged([*prefix, f"nanochat_hf.training.{name}", *argv], run_dir / "logs" / f"{name}.log", env)
            (work / "final").rename(run_dir / MODELS[name])

        return run

    def eval_stage(model: str) -> Callable[[], None]:
        def run() -> None:
            argv = ["--model", str(run_dir / model), "--stage", model, "--max-per-task", str(per_task)]
            if model == "base":
                argv += ["--bpb-data", data_source(), "--bpb-tokens", str(spec.eval_bpb_tokens)]
            if tier == "cpu":
                argv += ["--tier", "cpu"]
            if eval_max_tokens is not None:
                argv += ["--max-tokens", str(eval_max_tokens)]
            run_logged([sys.executable, "-m", "nanochat_hf.evaluation.evaluate", *argv],
                       run_dir / "logs" / f"eval_{model}.log", env)

        return run

    stage("corpus", corpus_dir, corpus_stage)
    stage("tokenizer", tokenizer_dir, tokenizer_stage)
    previous = None
    for name in stages:
        model = MODELS[name]
        stage(name, run_dir / model, training_stage(name, previous))
        stage(f"eval_{model}", run_dir / model / f"eval_{model}.json", eval_stage(model))
        previous = run_dir / model

    # The report is always rewritten: it summarises whatever the run folder holds now.
    stages_log.pop("report", None)
    log_file.write_text(json.dumps(log, indent=2))
    write_report(run_dir)
    print(f"[speedrun] report: {run_dir / 'report.md'}", flush=True)
    return log
