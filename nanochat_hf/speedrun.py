"""The speedrun: every stage of the pipeline, in order, into one run folder.

Built so far: corpus -> tokenizer -> pretraining (the base model). Later stages (midtraining, SFT, RL,
evaluation, report) append themselves here. A stage whose output folder exists is skipped; an interrupted
pretraining resumes from its last checkpoint.
"""

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .data.embedded import embedded_corpus, write_corpus_shards
from .data.pretrain import open_text_stream
from .pretrain import parse_args, train
from .tokenizer import train_tokenizer

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@dataclass(frozen=True)
class Tier:
    vocab_size: int
    tokenizer_max_chars: int | None = 2_000_000_000


TIERS: dict[str, Tier] = {
    "cpu": Tier(vocab_size=8192, tokenizer_max_chars=None),
    "d12": Tier(vocab_size=32768),
    "d20": Tier(vocab_size=32768),
    "d26": Tier(vocab_size=32768),
    "d32": Tier(vocab_size=32768),
}


def _stage(name: str, output: Path, fn: Callable[[], None], log: dict) -> None:
    if output.exists():
        print(f"[speedrun] {name}: done already ({output}), skipping", flush=True)
        log[name] = {"skipped": True}
        return
    print(f"[speedrun] {name} ...", flush=True)
    start = time.perf_counter()
    fn()
    log[name] = {"seconds": round(time.perf_counter() - start, 2)}
    print(f"[speedrun] {name}: {log[name]['seconds']} s -> {output}", flush=True)


def run_speedrun(tier: str, run_dir: str | Path, corpus: str | None = None, pretrain_steps: int | None = None) -> dict:
    """Run every built stage of `tier` into `run_dir`; returns the per-stage timings.

    `corpus` replaces the tier's pretraining text (a folder of parquet/jsonl/txt files); `pretrain_steps`
    shortens pretraining (a smoke run).
    """
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
    recipe = RECIPES / tier / "pretrain.yaml"
    if not recipe.exists():
        raise FileNotFoundError(f"{recipe} not found: run the speedrun from a checkout of nanochat-hf")
    spec = TIERS[tier]
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log: dict = {"tier": tier, "spec": asdict(spec)}
    corpus_dir, tokenizer_dir, base_dir = run_dir / "corpus", run_dir / "tokenizer", run_dir / "base"

    def corpus_stage() -> None:
        if corpus is not None:  # a given corpus is read where it is
            corpus_dir.mkdir()
            (corpus_dir / "SOURCE").write_text(str(Path(corpus).resolve()))
        elif tier == "cpu":
            write_corpus_shards(corpus_dir)
        else:
            corpus_dir.mkdir()
            (corpus_dir / "SOURCE").write_text("karpathy/climbmix-400b-shuffle")

    def data_source() -> str:
        source = corpus_dir / "SOURCE"
        return source.read_text() if source.exists() else str(corpus_dir)

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

    def pretrain_stage() -> None:
        argv = ["--config", str(recipe), "--output_dir", str(run_dir / "pretrain"), "--tokenizer", str(tokenizer_dir),
                "--dataset", data_source(), "--resume", "true"]
        if pretrain_steps is not None:
            argv += ["--num_iterations", str(pretrain_steps), "--eval_every", str(pretrain_steps),
                     "--save_every", str(pretrain_steps)]
        final = train(parse_args(argv))
        final.rename(base_dir)

    _stage("corpus", corpus_dir, corpus_stage, log)
    _stage("tokenizer", tokenizer_dir, tokenizer_stage, log)
    _stage("pretrain", base_dir, pretrain_stage, log)
    (run_dir / "speedrun.json").write_text(json.dumps(log, indent=2))
    return log
