"""`nanochat-hf report`: the report card of a speedrun folder, as nanochat's report.md.

It reads what the stages left in the run folder -- ``speedrun.json`` (tier, per-stage wall times), ``tokenizer/``,
the trainers' ``train/<stage>/losses.jsonl`` and ``bpb.jsonl``, the model folders ``base/ mid/ sft/ rl/`` and the
``eval_<stage>.json`` that ``nanochat-hf eval`` writes into each -- and writes ``report.md`` with PNG plots of the
loss and bits-per-byte curves under ``report/``. Every piece is optional: a stage that has not run, a metric its
evaluation did not produce or a file that cannot be read shows as "—" (the unreadable ones are listed under Notes),
so the report can be written at any point of a run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from .chatcore import BESIDE_CHATCORE, CATEGORICAL_TASKS, CHATCORE, CHATCORE_CAT, CHATCORE_TASKS

DASH = "—"
MODEL_STAGES = ("base", "mid", "sft", "rl")
TRAIN_STAGES = ("pretrain", "midtrain", "sft", "rl")
# The order the speedrun runs its stages in; a timing key of speedrun.json that is not here is listed after them.
TIMED_STAGES = ("corpus", "tokenizer", "pretrain", "eval_base", "midtrain", "eval_mid", "sft", "eval_sft", "rl",
                "eval_rl")
# nanochat's d20 speedrun on 8xH100 (Oct 2025), from its report.md timestamps (perf-anchors.md §1.3); eval_base is
# base_loss + base_eval, tokenizer is tok_train + tok_eval. Total 3h48m excluding RL.
NANOCHAT_D20_TIMES = {
    "tokenizer": "~1.6 min", "pretrain": "~3h10m", "eval_base": "5.4 min", "midtrain": "13.0 min",
    "eval_mid": "5.7 min", "sft": "6.9 min", "eval_sft": "5.9 min", "rl": "43.4 min", "eval_rl": "2.5 min",
}
PIPELINE_NOTES = {"2025": "nanochat's October 2025 pipeline: pretraining, midtraining, SFT",
                  "2026": "nanochat HEAD's: pretraining, then SFT from the base model; no midtraining"}
DEFAULT_GPU_HOUR_USD = 3.0  # nanochat's H100 rate: an 8-GPU node at $24/h
DEFAULT_GPUS = 8

# Summary rows of the chat tasks, in nanochat's order: ChatCORE's tasks, ChatCORE and ChatCORE_cat, then the tasks
# reported beside them (SpellingBee, then any other the eval JSON holds, such as the CPU tier's Arithmetic and
# SimpleSpelling). A task's row matches on the normalised name, so "arc_easy" fills "ARC-Easy".
CHATCORE_NOTE = (
    f"{CHATCORE}: the mean of (accuracy - baseline) / (1 - baseline) over "
    + ", ".join(f"{task} {baseline:g}" for task, baseline in CHATCORE_TASKS.items())
    + f"; {CHATCORE_CAT}: the same over {', '.join(CATEGORICAL_TASKS)} only; {', '.join(BESIDE_CHATCORE)} is "
    "reported beside them and counts in neither."
)
# The chat-format checks the CPU tier is judged on: evaluate.py writes them pooled over the generative tasks'
# replies as chat.format.ends_turn_rate / calculator_rate (and per task); the other names are accepted too.
FORMAT_ROWS = (
    ("Ends its turn", "ends_turn_rate", {"endsturnrate", "endsturn", "endsitsturn", "endturn", "turnendrate"}),
    ("Calls the calculator", "calculator_rate", {"calculatorrate", "callscalculator", "calculatorcallrate",
                                                 "calculatorcalls", "toolcallrate"}),
)
VALUE_KEYS = ("accuracy", "rate", "value", "score", "mean")
LOG_TAIL_LINES = 20
SMOOTH_FROM_POINTS = 100


# --------------------------------------------------------------------------------------------------------------
# Formatting


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def fmt_metric(value: float | None) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return DASH
    return f"{value:.4f}"


def fmt_duration(seconds: float | None) -> str:
    """nanochat's style: 3h48m for long stages, 4m05s for minutes, 12.3 s below a minute."""
    if seconds is None:
        return DASH
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = int(round(seconds)) // 60
    if minutes < 60:
        return f"{minutes}m{int(round(seconds)) % 60:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# --------------------------------------------------------------------------------------------------------------
# Reading the run folder


class _Notes(list):
    """Pieces of the run folder that exist but could not be read: listed at the end of the report."""

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = run_dir

    def read_json(self, path: Path) -> dict | None:
        if not path.is_file():
            return None
        name = Path(os.path.relpath(path, self.run_dir)).as_posix()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            self.append(f"`{name}` could not be read ({e}); its values show as {DASH}")
            return None
        if not isinstance(data, dict):
            self.append(f"`{name}` holds a {type(data).__name__}, not a JSON object; ignored")
            return None
        return data


def read_curve(path: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) points of a jsonl log, one per step (the last line wins after a resume), sorted by step.

    Lines that are not JSON objects with a numeric `step` and a finite `key` are skipped: an interrupted run may
    leave a half-written last line."""
    points: dict[int, float] = {}
    if not path.is_file():
        return []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            step, value = int(row["step"]), float(row[key])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        if math.isfinite(value):
            points[step] = value
    return sorted(points.items())


def _train_dir(run_dir: Path, stage: str) -> Path | None:
    # train/<stage>/ is the layout; <stage>/ is where the first speedrun put its pretraining output.
    for candidate in (run_dir / "train" / stage, run_dir / stage):
        if (candidate / "losses.jsonl").is_file() or (candidate / "bpb.jsonl").is_file():
            return candidate
    return None


def _metric_value(value) -> float | None:
    if isinstance(value, dict):
        for key in VALUE_KEYS:
            if key in value:
                return _metric_value(value[key])
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def find_metric(results: dict | None, names: set[str], max_depth: int = 4) -> float | None:
    """The first value (breadth first) under a key whose normalised name is in `names`; a dict value yields its
    accuracy/rate/value/score."""
    level = [results] if isinstance(results, dict) else []
    for _ in range(max_depth):
        deeper = []
        for node in level:
            for key, value in node.items():
                if _norm(str(key)) in names:
                    found = _metric_value(value)
                    if found is not None:
                        return found
                if isinstance(value, dict):
                    deeper.append(value)
        level = deeper
    return None


def _get(data: dict | None, *keys):
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def parameter_count(model_dir: Path) -> int | None:
    """Parameters of a save_pretrained folder, from the safetensors headers (no weights are loaded)."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        return None
    total = 0
    for shard in shards:
        with safe_open(str(model_dir / shard), framework="pt") as f:
            for name in f.keys():
                total += math.prod(f.get_slice(name).get_shape())
    return total


# --------------------------------------------------------------------------------------------------------------
# Environment


def git_state(path: Path) -> dict[str, str | bool | None]:
    """Branch, commit, dirty flag and subject of the git checkout holding `path`; commit None when there is none
    (no git, not a checkout)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "branch": None, "dirty": None, "message": None}
    status = git("status", "--porcelain")
    return {"commit": commit, "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(status) if status is not None else None, "message": git("log", "-1", "--pretty=%s")}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _memory_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (AttributeError, ValueError, OSError):
        return None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict:
    """The machine writing the report: platform, CPU, memory, GPUs and the stack's versions."""
    import torch

    env = {
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpus": os.cpu_count(),
        "memory_gb": _memory_gb(),
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in ("torch", "transformers", "trl", "accelerate", "datasets", "tokenizers",
                                              "lighteval", "nanochat-hf")},
        "gpus": 0,
    }
    if torch.cuda.is_available():
        env["gpus"] = torch.cuda.device_count()
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = props.name
        env["gpu_memory_gb"] = sum(torch.cuda.get_device_properties(i).total_memory
                                   for i in range(env["gpus"])) / 1e9
        env["cuda"] = torch.version.cuda
    return env


# --------------------------------------------------------------------------------------------------------------
# Plots


def plot_curves(curves: dict[str, list[tuple[int, float]]], offsets: dict[str, int], path: Path, ylabel: str,
                title: str) -> bool:
    """One curve per stage, each shifted by its stage's step offset so the pipeline reads left to right. A long
    curve is drawn faint with its exponential moving average (nanochat's 0.9, debiased) solid on top; a short one
    as it is, since the average would only lag. False when there is nothing to draw (a stale plot is removed) or
    matplotlib is missing."""
    curves = {stage: points for stage, points in curves.items() if points}
    if not curves:
        path.unlink(missing_ok=True)
        return False
    if (figure := _new_figure((8, 4.5))) is None:
        return False
    fig, ax = figure
    for i, (stage, points) in enumerate(curves.items()):
        color = f"C{i}"
        steps = [offsets.get(stage, 0) + s for s, _ in points]
        values = [v for _, v in points]
        if len(values) >= SMOOTH_FROM_POINTS:
            smooth, ema = [], 0.0
            for n, v in enumerate(values, 1):
                ema = 0.9 * ema + 0.1 * v
                smooth.append(ema / (1 - 0.9**n))
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            values = smooth
        ax.plot(steps, values, color=color, linewidth=1.6, label=stage)
        if offsets.get(stage, 0):
            ax.axvline(offsets[stage], color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("optimizer step (stages one after another)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)
    return True


def _new_figure(size: tuple[float, float]):
    """A figure and its one axes, or None where matplotlib is not installed."""
    try:
        # The object API with the Agg canvas: no pyplot state, no backend switch in the caller's process.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save_figure(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        _publish(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------
# The report


def _check_run_dir(run_dir: Path) -> None:
    if not run_dir.exists():
        raise FileNotFoundError(f"run folder {run_dir} does not exist: pass the --run-dir the speedrun wrote "
                                "(default runs/<tier>)")
    if not run_dir.is_dir():
        raise NotADirectoryError(f"{run_dir} is a file, not a run folder: pass the folder the speedrun wrote")
    known = ("speedrun.json", "corpus", "tokenizer", "train", "logs", *MODEL_STAGES, *TRAIN_STAGES)
    if not any((run_dir / name).exists() for name in known):
        raise ValueError(f"{run_dir} holds no speedrun output (none of {', '.join(known)}): pass the folder "
                         "`nanochat-hf speedrun --run-dir` wrote")


def _stage_timings(speedrun: dict | None) -> dict[str, dict]:
    stages = _get(speedrun, "stages")
    if not isinstance(stages, dict):  # the first speedrun logged each stage at the top level
        stages = {k: v for k, v in (speedrun or {}).items() if k in TIMED_STAGES}
    return {k: v for k, v in stages.items() if isinstance(v, dict)}


def _seconds(entry: dict | None) -> float | None:
    value = _get(entry, "seconds")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _env_section(env: dict, git: dict, speedrun: dict | None) -> list[str]:
    lines = ["## Environment", "", "### Git"]
    if git["commit"] is None:
        lines.append("- not a git checkout (or git is not installed)")
    else:
        lines += [f"- Branch: {git['branch']}", f"- Commit: {git['commit'][:12]} "
                  f"({'dirty' if git['dirty'] else 'clean' if git['dirty'] is not None else 'status unknown'})",
                  f"- Message: {git['message']}"]
    lines += ["", "### Hardware", f"- Platform: {env['platform']}", f"- CPU: {env['cpu']} ({env['cpus']} logical)"]
    if env.get("memory_gb"):
        lines.append(f"- Memory: {env['memory_gb']:.1f} GB")
    if env["gpus"]:
        lines += [f"- GPUs: {env['gpus']}x {env['gpu']} ({env['gpu_memory_gb']:.1f} GB in all)",
                  f"- CUDA: {env['cuda']}"]
    else:
        lines.append("- GPUs: none")
    if speedrun and ("device" in speedrun or "gpus" in speedrun):
        lines.append(f"- The run itself: device {speedrun.get('device', DASH)}, GPUs {speedrun.get('gpus', DASH)}")
    lines += ["", "### Software", f"- Python: {env['python']}"]
    lines += [f"- {name}: {version}" for name, version in env["packages"].items()]
    return lines + [""]


def _tokenizer_section(run_dir: Path, notes: _Notes) -> list[str]:
    lines = ["## Tokenizer", ""]
    folder = run_dir / "tokenizer"
    if not folder.is_dir():
        return lines + [f"{DASH} (no `tokenizer/` folder yet)", ""]
    from ..tokenizer.bpe import SPECIAL_TOKENS, compression_stats, load_tokenizer

    try:
        tokenizer = load_tokenizer(str(folder))
        vocab = tokenizer.get_vocab()
        stats = compression_stats(tokenizer)
    except Exception as e:  # noqa: BLE001  (a broken folder is a note, not a failed report)
        notes.append(f"`tokenizer/` could not be loaded ({type(e).__name__}: {e})")
        return lines + [DASH, ""]
    specials = sum(token in vocab for token in SPECIAL_TOKENS)
    lines += [f"- Vocabulary: {len(tokenizer):,} tokens ({specials} of nanochat's {len(SPECIAL_TOKENS)} special "
              "tokens)", "",
              "Compression on the built-in samples (bytes per token; higher is better):", ""]
    rows = [[kind, f"{s['bytes']:,}", f"{s['tokens']:,}", f"{s['bytes_per_token']:.2f}"] for kind, s in stats.items()]
    total_bytes, total_tokens = sum(s["bytes"] for s in stats.values()), sum(s["tokens"] for s in stats.values())
    if total_tokens:
        rows.append(["**all**", f"{total_bytes:,}", f"{total_tokens:,}", f"{total_bytes / total_tokens:.2f}"])
    return lines + _table(["Text", "Bytes", "Tokens", "Bytes/token"], rows) + [""]


def _model_section(run_dir: Path, notes: _Notes) -> list[str]:
    rows = []
    for stage in MODEL_STAGES:
        config = notes.read_json(run_dir / stage / "config.json")
        if config is None:
            continue
        try:
            params = parameter_count(run_dir / stage)
        except Exception as e:  # noqa: BLE001
            notes.append(f"`{stage}/` weights could not be read ({type(e).__name__}: {e})")
            params = None
        rows.append([stage, f"{params:,}" if params else DASH, str(config.get("num_hidden_layers", DASH)),
                     str(config.get("hidden_size", DASH)), str(config.get("num_attention_heads", DASH)),
                     str(config.get("max_position_embeddings", DASH)), f"{config.get('vocab_size', DASH):,}"
                     if isinstance(config.get("vocab_size"), int) else DASH, str(config.get("generation", DASH))])
    lines = ["## Model", ""]
    if not rows:
        return lines + [f"{DASH} (no model folder yet)", ""]
    header = ["Folder", "Parameters", "Depth", "Width", "Heads", "Context", "Vocab", "Generation"]
    return lines + _table(header, rows) + [""]


def _chat_tasks(results: dict | None) -> dict[str, dict]:
    tasks = _get(results, "chat", "tasks")
    return {str(k): v for k, v in tasks.items() if isinstance(v, dict)} if isinstance(tasks, dict) else {}


def _task_accuracy(results: dict | None, names: set[str]) -> float | None:
    for name, task in _chat_tasks(results).items():
        if _norm(name) in names:
            return _metric_value(task)
    return None


def _format_metric(results: dict | None, key: str, names: set[str]) -> float | None:
    pooled = _metric_value(_get(results, "chat", "format", key))
    return pooled if pooled is not None else find_metric(_get(results, "chat"), names)


def _summary_section(evals: dict[str, dict | None], bpb_curves: dict[str, list]) -> list[str]:
    def row(label: str, values: list[float | None]) -> list[str]:
        return [label, *(fmt_metric(v) for v in values)]

    # The base column of the chat rows stays empty: a base model is scored by CORE alone.
    chat_stages = [None, *(evals[s] for s in MODEL_STAGES[1:])]
    rows = [row("CORE", [_get(evals["base"], "core", "core_metric"), None, None, None])]

    def task_row(label: str) -> list[str]:
        return row(label, [_task_accuracy(r, {_norm(label)}) for r in chat_stages])

    known = {_norm(name) for name in (*CHATCORE_TASKS, *BESIDE_CHATCORE)}
    extra = dict.fromkeys(name for r in chat_stages for name in _chat_tasks(r) if _norm(name) not in known)
    rows += [task_row(label) for label in CHATCORE_TASKS]
    rows.append(row(CHATCORE, [_metric_value(_get(r, "chat", "chatcore")) for r in chat_stages]))
    rows.append(row(CHATCORE_CAT, [_metric_value(_get(r, "chat", "chatcore_cat")) for r in chat_stages]))
    rows += [task_row(label) for label in (*BESIDE_CHATCORE, *extra)]
    for label, key, names in FORMAT_ROWS:
        rows.append(row(label, [_format_metric(r, key, names) for r in chat_stages]))
    # Bits per byte: the base evaluation's, else the last validation point of its training stage.
    bpb = [_get(evals["base"], "bpb", "val_bpb"), None, None, None]
    for i, stage in enumerate(("pretrain", "midtrain")):
        if bpb[i] is None and bpb_curves.get(stage):
            bpb[i] = bpb_curves[stage][-1][1]
    rows.append(row("val bpb", bpb))
    rows.append(row("train bpb", [_get(evals["base"], "bpb", "train_bpb"), None, None, None]))
    lines = ["## Summary", ""] + _table(["Metric", "BASE", "MID", "SFT", "RL"], rows)
    lines += ["", f"{DASH}: not run, not evaluated, or not measured by that stage's evaluation. {CHATCORE_NOTE} Ends "
              "its turn: the share of generated replies that end with `<|assistant_end|>`; calls the calculator: the "
              "share of replies to arithmetic questions that use the python tool. Bits per byte: the base "
              "evaluation's on each split, else the last validation point of the stage's training."]
    centered = _get(evals["base"], "core", "centered_results")
    if isinstance(centered, dict) and centered:
        accuracy = _get(evals["base"], "core", "results") or {}
        lines += ["", "### CORE tasks (base)", ""]
        lines += _table(["Task", "Accuracy", "Centered"],
                        [[t, fmt_metric(accuracy.get(t)), fmt_metric(c)] for t, c in centered.items()])
    detail = []
    for stage in MODEL_STAGES[1:]:
        for name, task in _chat_tasks(evals[stage]).items():
            examples = task.get("examples")
            detail.append([stage, name, f"{examples:,}" if isinstance(examples, int) else DASH,
                           fmt_metric(_metric_value(task)), fmt_metric(_metric_value(task.get("ends_turn_rate"))),
                           fmt_metric(_metric_value(task.get("calculator_rate")))])
    if detail:
        lines += ["", "### Chat evaluations", ""]
        lines += _table(["Stage", "Task", "Items", "Accuracy", "Ends its turn", "Calls the calculator"], detail)
    return lines + [""]


def plot_chat_format(evals: dict[str, dict | None], path: Path) -> bool:
    """Grouped bars: per chat stage, the share of replies that end their turn and that call the calculator."""
    stages = [s for s in MODEL_STAGES[1:] if evals[s] is not None]
    values = {label: [_format_metric(evals[s], key, names) for s in stages] for label, key, names in FORMAT_ROWS}
    if not any(v is not None for vs in values.values() for v in vs):
        path.unlink(missing_ok=True)
        return False
    if (figure := _new_figure((6, 4))) is None:
        return False
    fig, ax = figure
    width = 0.38
    for i, (label, vs) in enumerate(values.items()):
        xs = [j + (i - 0.5) * width for j in range(len(stages))]
        ax.bar(xs, [v if v is not None else 0.0 for v in vs], width, label=label, color=f"C{i}")
        for x, v in zip(xs, vs, strict=True):
            ax.annotate(DASH if v is None else f"{v:.2f}", (x, v or 0.0), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(stages)), [s.upper() for s in stages])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("share of replies")
    ax.set_title("Chat format")
    ax.legend(loc="upper left")
    fig.tight_layout()
    _save_figure(fig, path)
    return True


def _timing_section(speedrun: dict | None, tier: str | None, gpu_hour_usd: float, gpus: int | None) -> list[str]:
    timings = _stage_timings(speedrun)
    order = [*TIMED_STAGES, *(s for s in timings if s not in TIMED_STAGES)]
    rows, total, total_without_rl = [], 0.0, 0.0
    for stage in order:
        entry = timings.get(stage)
        seconds = _seconds(entry)
        shown = fmt_duration(seconds)
        if _get(entry, "skipped"):  # a re-run keeps the first run's time of a stage it skips
            shown = f"{shown} (earlier run)" if seconds is not None else "skipped (done earlier)"
        rows.append([stage, shown, NANOCHAT_D20_TIMES.get(stage, DASH)])
        total += seconds or 0.0
        total_without_rl += 0.0 if stage in ("rl", "eval_rl") else seconds or 0.0
    lines = ["## Timings", ""]
    lines += _table(["Stage", "Wall time", "nanochat d20, 8xH100"], rows)
    total_line = f"Total wall clock time: {fmt_duration(total) if timings else DASH}"
    if timings:
        with_rl = "rl" in timings or "eval_rl" in timings
        total_line += f" ({fmt_duration(total_without_rl) + ' without RL; ' if with_rl else ''}nanochat's d20 took " \
                      "3h48m without RL)"
    lines += ["", total_line]
    device = _get(speedrun, "device")
    if tier == "cpu" or device == "cpu":
        lines.append("Cost: not applicable -- a CPU run (≈ $0 of GPU time).")
    else:
        run_gpus = _get(speedrun, "gpus")
        n = gpus or (run_gpus if isinstance(run_gpus, int) and run_gpus > 0 else DEFAULT_GPUS)
        hours = total / 3600
        lines.append(f"Cost estimate: {hours:.2f} h x {n} GPUs x ${gpu_hour_usd:.2f}/GPU-hour = "
                     f"${hours * n * gpu_hour_usd:,.2f}")
    return lines + [""]


def _training_section(loss_curves: dict, bpb_curves: dict, plots: dict[str, Path | None], out: Path) -> list[str]:
    lines = ["## Plots and training curves", ""]
    for name, path in plots.items():
        if path is not None:
            lines += [f"![{name}]({Path(os.path.relpath(path, out.parent)).as_posix()})", ""]
    if not any(loss_curves.values()) and not any(bpb_curves.values()):
        return lines + [f"{DASH} (no `train/<stage>/losses.jsonl` yet)", ""]
    rows = []
    for stage in TRAIN_STAGES:
        losses, bpbs = loss_curves.get(stage, []), bpb_curves.get(stage, [])
        rows.append([stage, f"{losses[-1][0]:,}" if losses else DASH,
                     fmt_metric(losses[0][1]) if losses else DASH, fmt_metric(losses[-1][1]) if losses else DASH,
                     fmt_metric(min(v for _, v in bpbs)) if bpbs else DASH])
    return lines + _table(["Stage", "Steps", "First loss", "Last loss", "Best val bpb"], rows) + [""]


def _logs_section(run_dir: Path, speedrun: dict | None) -> list[str]:
    """The tail of every stage's log: the speedrun's logs/<stage>.log in stage order, then any *.log a trainer
    left in its output folder."""
    timings = _stage_timings(speedrun)
    logs = []
    for stage in [*TIMED_STAGES, *timings]:
        named = _get(timings.get(stage), "log")
        logs += [run_dir / named] if isinstance(named, str) else []
        logs.append(run_dir / "logs" / f"{stage}.log")
    logs += sorted((run_dir / "logs").glob("*.log")) if (run_dir / "logs").is_dir() else []
    for stage in TRAIN_STAGES:
        folder = run_dir / "train" / stage
        logs += sorted(folder.glob("*.log")) if folder.is_dir() else []
    logs = [p for p in dict.fromkeys(p.resolve() for p in logs) if p.is_file()]
    if not logs:
        return []
    lines = ["## Stage logs", ""]
    for path in logs:
        tail = path.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL_LINES:]
        name = os.path.relpath(path, run_dir.resolve())
        fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", "\n".join(tail))), default=0))
        lines += [f"### {name} (last {len(tail)} lines)", "", fence, *tail, fence, ""]
    return lines


def _publish(tmp: str, path: Path) -> None:
    # mkstemp makes the file private (0600); a report is for reading, so give it the usual 0644 before the rename.
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        _publish(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_report(
    run_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    gpu_hour_usd: float = DEFAULT_GPU_HOUR_USD,
    gpus: int | None = None,
) -> Path:
    """Write the report card of the speedrun folder `run_dir` to `out` (default ``run_dir/report.md``), with
    ``report/loss.png`` and ``report/bpb.png`` beside it; returns the report's path.

    The GPU cost is total wall time x `gpus` x `gpu_hour_usd`; `gpus` defaults to speedrun.json's count, else 8
    (nanochat's node). CPU runs state no cost."""
    run_dir = Path(run_dir).expanduser()
    _check_run_dir(run_dir)
    if not (gpu_hour_usd >= 0 and math.isfinite(gpu_hour_usd)):
        raise ValueError(f"gpu_hour_usd={gpu_hour_usd}: give the price of one GPU-hour in dollars, >= 0")
    if gpus is not None and gpus < 1:
        raise ValueError(f"gpus={gpus}: give the number of GPUs the run used, >= 1")
    out = Path(out).expanduser() if out is not None else run_dir / "report.md"
    notes = _Notes(run_dir)
    speedrun = notes.read_json(run_dir / "speedrun.json")
    tier = _get(speedrun, "tier")
    evals = {s: notes.read_json(run_dir / s / f"eval_{s}.json") or notes.read_json(run_dir / f"eval_{s}.json")
             for s in MODEL_STAGES}
    loss_curves, bpb_curves = {}, {}
    for stage in TRAIN_STAGES:
        folder = _train_dir(run_dir, stage)
        loss_curves[stage] = read_curve(folder / "losses.jsonl", "loss") if folder else []
        bpb_curves[stage] = read_curve(folder / "bpb.jsonl", "bpb") if folder else []
    offsets, at = {}, 0
    for stage in TRAIN_STAGES:
        offsets[stage] = at
        at += max((s for s, _ in loss_curves[stage] + bpb_curves[stage]), default=0)

    plot_dir = out.parent / "report"
    plots = {
        "training loss": plot_dir / "loss.png"
        if plot_curves(loss_curves, offsets, plot_dir / "loss.png", "training loss", "Training loss per stage")
        else None,
        "validation bits per byte": plot_dir / "bpb.png"
        if plot_curves(bpb_curves, offsets, plot_dir / "bpb.png", "validation bits per byte",
                       "Validation bits per byte")
        else None,
        "chat format": plot_dir / "chat_format.png" if plot_chat_format(evals, plot_dir / "chat_format.png") else None,
    }
    started = _get(speedrun, "started")
    lines = ["# nanochat-hf training report", "",
             f"- Generated: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
             f"- Run folder: `{run_dir.resolve()}`", f"- Tier: {tier or DASH}", f"- Run started: {started or DASH}"]
    pipeline = _get(speedrun, "pipeline")
    if pipeline:
        lines.append(f"- Pipeline: {pipeline} ({PIPELINE_NOTES.get(pipeline, DASH)})")
    spec = _get(speedrun, "spec")
    if isinstance(spec, dict) and spec:
        lines.append("- Tier settings: " + ", ".join(f"{k}={v}" for k, v in spec.items()))
    lines.append("")
    # The code's git state when the run started, if the speedrun recorded it; else the checkout's state now.
    git = _get(speedrun, "git")
    if not (isinstance(git, dict) and {"commit", "branch", "dirty", "message"} <= git.keys()):
        git = git_state(Path(__file__).resolve().parent)
    lines += _env_section(environment(), git, speedrun)
    lines += _tokenizer_section(run_dir, notes)
    lines += _model_section(run_dir, notes)
    lines += _summary_section(evals, bpb_curves)
    lines += _timing_section(speedrun, tier, gpu_hour_usd, gpus)
    lines += _training_section(loss_curves, bpb_curves, plots, out)
    lines += _logs_section(run_dir, speedrun)
    if any(p is None for p in plots.values()) and any(loss_curves.values()):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            notes.append("plots need matplotlib: `pip install 'matplotlib>=3.8,<4'`")
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    _write_atomically(out, "\n".join(lines))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanochat-hf report",
        description="Write report.md for a speedrun folder: environment, tokenizer, model, the metrics of every "
        "stage, timings, cost, and plots of the loss and bits-per-byte curves (report/*.png).",
    )
    parser.add_argument("--run-dir", required=True, help="the folder `nanochat-hf speedrun` wrote")
    parser.add_argument("--out", help="report path (default RUN_DIR/report.md; plots go to report/ beside it)")
    parser.add_argument("--gpu-hour-usd", type=float, default=DEFAULT_GPU_HOUR_USD,
                        help="price of one GPU-hour for the cost estimate (default 3.00, nanochat's H100 rate)")
    parser.add_argument("--gpus", type=int, help="GPUs the run used (default: speedrun.json's count, else 8)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        path = write_report(args.run_dir, args.out, gpu_hour_usd=args.gpu_hour_usd, gpus=args.gpus)
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        print(f"nanochat-hf report: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    print(f"report written to {path}")


if __name__ == "__main__":
    main()
