"""Training mixtures for midtraining and SFT: nanochat's for the GPU tiers, the project's generators for the CPU tier.

A mixture is a list of (task, split, rows). `rows=None` takes the whole split; a number takes that many rows (the
first ones after nanochat's per-task shuffle with seed 42 for Hub tasks, the size for generated tasks); a task
listed twice is two epochs of it. The parts are concatenated and shuffled together with the caller's seed.
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets

from .registry import GENERATED_TASKS, load_task
from .spelling import embedded_words, simple_spelling, spelling_bee

Part = tuple[str, str, int | None]

# nanochat before midtraining was folded into SFT (nanochat-spec.md §4.3, §4.4): mid_train's final mixture
# (SmolTalk 460K + MMLU 100K + GSM8K 8K + identity x2 + SimpleSpelling 200K + SpellingBee 80K = 848K rows) and
# chat_sft's (ARC-Easy 2.3K + ARC-Challenge 1.1K + GSM8K 8K + SmolTalk 10K + identity + spelling 300 + 300 = 23K).
NANOCHAT_MIXTURES: dict[tuple[str, str], list[Part]] = {
    ("midtrain", "train"): [
        ("smoltalk", "train", None),
        ("mmlu", "auxiliary_train", None),
        ("gsm8k", "train", None),
        ("identity", "train", None),
        ("identity", "train", None),
        ("simplespelling", "train", 200_000),
        ("spellingbee", "train", 80_000),
    ],
    ("midtrain", "val"): [("smoltalk", "test", None), ("mmlu", "test", 5200), ("gsm8k", "test", 420)],
    ("sft", "train"): [
        ("arc_easy", "train", None),
        ("arc_challenge", "train", None),
        ("gsm8k", "train", None),
        ("smoltalk", "train", 10_000),
        ("identity", "train", None),
        ("simplespelling", "train", 300),
        ("spellingbee", "train", 300),
    ],
    ("sft", "val"): [("smoltalk", "test", None)],
    # HEAD's chat_sft (950a1dc; the 2026 pipeline, from the base model): SmolTalk + MMLU x3 (--mmlu-epochs) +
    # GSM8K x4 (--gsm8k-epochs), about 790K rows; validated like midtraining
    ("sft-2026", "train"): [
        ("smoltalk", "train", None),
        *[("mmlu", "auxiliary_train", None)] * 3,
        *[("gsm8k", "train", None)] * 4,
    ],
    ("sft-2026", "val"): [("smoltalk", "test", None), ("mmlu", "test", 5200), ("gsm8k", "test", 420)],
}

# The offline CPU tier (recipes/cpu: 4,096 tokens a step). Midtraining is one pass of about 1.1M tokens with the
# CPU tokenizer (~275 steps; arithmetic ~70 tokens a row, spelling bee ~150, simple spelling ~30), seeing every
# format thousands of times; SFT repeats the formats in about 2,600 rows. The identity file is small, so it is
# repeated more than nanochat's (x2 in midtraining) for a tiny model to pick up its name.
CPU_MIXTURES: dict[tuple[str, str], list[Part]] = {
    ("midtrain", "train"): [
        ("identity", "train", None),
        ("identity", "train", None),
        ("identity", "train", None),
        ("arithmetic", "train", 6000),
        ("simplespelling", "train", 8000),
        ("spellingbee", "train", 3000),
    ],
    ("midtrain", "val"): [("arithmetic", "test", 100), ("simplespelling", "test", 100), ("spellingbee", "test", 50)],
    ("sft", "train"): [
        ("identity", "train", None),
        ("identity", "train", None),
        ("arithmetic", "train", 1500),
        ("simplespelling", "train", 500),
        ("spellingbee", "train", 500),
    ],
    ("sft", "val"): [("arithmetic", "test", 100), ("simplespelling", "test", 50), ("spellingbee", "test", 50)],
}
# The 2026 pipeline has no midtraining: its SFT teaches the formats from the base model, on midtraining's mixture
# (as HEAD's SFT took over nanochat's midtraining data), trained on nanochat's mask.
CPU_MIXTURES["sft-2026", "train"] = CPU_MIXTURES["midtrain", "train"]
CPU_MIXTURES["sft-2026", "val"] = CPU_MIXTURES["midtrain", "val"]

TIERS = ("cpu", "d12", "d20", "d24", "d26", "d32")
# "sft" is the 2025 pipeline's SFT (after midtraining), "sft-2026" HEAD's (from the base model)
STAGES = ("midtrain", "sft", "sft-2026")
NANOCHAT_SHUFFLE_SEED = 42  # nanochat shuffles every Hub task with seed 42 before taking its first rows

# Where build_mixture looks inside data_dir for local copies: `hf download <repo> --repo-type dataset
# --local-dir <data_dir>/<repo>` lays them out like this.
_REPOS = {
    "smoltalk": "HuggingFaceTB/smol-smoltalk",
    "mmlu": "cais/mmlu",
    "gsm8k": "openai/gsm8k",
    "arc_easy": "allenai/ai2_arc",
    "arc_challenge": "allenai/ai2_arc",
    "humaneval": "openai/openai_humaneval",
}


def mixture_parts(stage: str, tier: str = "d20", split: str = "train") -> list[Part]:
    """The (task, split, rows) list that :func:`build_mixture` concatenates."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
    if split not in ("train", "val"):
        raise ValueError(f"unknown mixture split {split!r}; choose train or val")
    return list((CPU_MIXTURES if tier == "cpu" else NANOCHAT_MIXTURES)[stage, split])


def build_mixture(
    stage: str,
    tier: str = "d20",
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    split: str = "train",
    identity: str | os.PathLike | None = None,
) -> datasets.Dataset:
    """The `messages` dataset a stage trains on (`split="val"`: the one it validates on), shuffled with `seed`.

    Tier `cpu` uses only the offline generators (identity, arithmetic, spelling with words from the Python docs);
    the other tiers use nanochat's Hub mixtures. `data_dir` holds local copies: `<data_dir>/<owner>/<name>/` for
    each Hub dataset (as `hf download ... --local-dir` writes them), `<data_dir>/words_alpha.txt` and
    `<data_dir>/identity.jsonl` (each used when present). `identity` is a personality JSONL that wins over both.
    """
    parts = mixture_parts(stage, tier, split)
    root = Path(data_dir) if data_dir is not None else None
    if identity is None and root is not None and (root / "identity.jsonl").is_file():
        identity = root / "identity.jsonl"
    words = None
    if tier == "cpu":
        words = embedded_words()
    elif root is not None and (root / "words_alpha.txt").is_file():
        words = str(root / "words_alpha.txt")

    loaded: dict[tuple[str, str], datasets.Dataset] = {}
    pieces = []
    for task, task_split, rows in parts:
        if task in GENERATED_TASKS:
            ds = _generate(task, task_split, rows, words)
        else:
            if (task, task_split) not in loaded:
                path = identity if task == "identity" else (root / _REPOS[task] if root is not None else None)
                loaded[task, task_split] = load_task(task, task_split, path)
            ds = loaded[task, task_split]
            if rows is not None:
                ds = ds.shuffle(seed=NANOCHAT_SHUFFLE_SEED).select(range(min(rows, len(ds))))
        pieces.append(ds.select_columns(["messages"]))
    return datasets.concatenate_datasets(pieces).shuffle(seed=seed)


def _generate(task: str, split: str, rows: int | None, words: list[str] | str | None) -> datasets.Dataset:
    if task == "arithmetic":
        return load_task(task, split, size=rows)
    if isinstance(words, list):
        return (spelling_bee if task == "spellingbee" else simple_spelling)(words, split, rows)
    return load_task(task, split, words, size=rows)
