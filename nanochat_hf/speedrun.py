"""The speedrun: every stage of the pipeline, in order, into one run folder.

Built so far: tokenizer (trained on the tier's corpus) -> a freshly initialised base model for it. Later stages
(pretraining, midtraining, SFT, RL, evaluation, report) append themselves here. A stage whose output folder
exists is skipped, so a re-run continues where the last one stopped.
"""

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .data.embedded import embedded_corpus
from .init_model import build_model, save_atomically
from .tokenizer import iter_texts, load_tokenizer, train_tokenizer


@dataclass(frozen=True)
class Tier:
    depth: int
    vocab_size: int
    head_dim: int | None = None  # None: nanochat's 128
    sequence_len: int = 2048
    window_pattern: str | None = None  # None: the generation's preset
    tokenizer_max_chars: int | None = 2_000_000_000


# The CPU tier is nanochat's runcpu.sh shape, scaled to a 2-core machine and the embedded corpus.
TIERS: dict[str, Tier] = {
    "cpu": Tier(depth=4, vocab_size=8192, head_dim=64, sequence_len=512, window_pattern="L", tokenizer_max_chars=None),
    "d12": Tier(depth=12, vocab_size=32768),
    "d20": Tier(depth=20, vocab_size=32768),
    "d26": Tier(depth=26, vocab_size=32768),
    "d32": Tier(depth=32, vocab_size=32768),
}


def _stage(run_dir: Path, name: str, output: Path, fn: Callable[[], None], log: dict) -> None:
    if output.exists():
        print(f"[speedrun] {name}: done already ({output}), skipping")
        log[name] = {"skipped": True}
        return
    print(f"[speedrun] {name} ...")
    start = time.perf_counter()
    fn()
    log[name] = {"seconds": round(time.perf_counter() - start, 2)}
    print(f"[speedrun] {name}: {log[name]['seconds']} s -> {output}")


def run_speedrun(tier: str, run_dir: str | Path, corpus: str | None = None) -> dict:
    """Run every built stage of `tier` into `run_dir`; returns the per-stage timings."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
    if tier != "cpu" and corpus is None:
        raise NotImplementedError(
            f"tier {tier!r} pretrains on nanochat's Hub dataset, which arrives with the pretraining stage; "
            "for now pass --corpus PATH (text/jsonl/parquet files) or use --tier cpu"
        )
    spec = TIERS[tier]
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log: dict = {"tier": tier, "spec": asdict(spec)}
    tokenizer_dir, base_dir = run_dir / "tokenizer", run_dir / "base"

    def tokenizer_stage() -> None:
        texts = embedded_corpus() if corpus is None else iter_texts([corpus])
        tokenizer = train_tokenizer(texts, vocab_size=spec.vocab_size, max_chars=spec.tokenizer_max_chars)
        save_dir = tokenizer_dir.with_name(tokenizer_dir.name + ".tmp")
        tokenizer.save_pretrained(save_dir)
        save_dir.rename(tokenizer_dir)

    def base_stage() -> None:
        tokenizer = load_tokenizer(str(tokenizer_dir))
        overrides = {"max_position_embeddings": spec.sequence_len}
        if spec.head_dim is not None:
            overrides["head_dim"] = spec.head_dim
        if spec.window_pattern is not None:
            overrides["window_pattern"] = spec.window_pattern
        model = build_model(tokenizer, spec.depth, **overrides)
        print(f"[speedrun] base model: {model.num_parameters():,} parameters, config {model.config.to_diff_dict()}")
        save_atomically(model, tokenizer, base_dir)

    _stage(run_dir, "tokenizer", tokenizer_dir, tokenizer_stage, log)
    _stage(run_dir, "base-init", base_dir, base_stage, log)
    (run_dir / "speedrun.json").write_text(json.dumps(log, indent=2))
    return log
