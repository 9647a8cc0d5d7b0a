"""The model card `nanochat-hf push` uploads: what trained the model, read from the run's own records, what it
scored, read from its evaluation results, and the report card, cleaned for publishing.

**Training** comes from the run folder: the model folder's parent when it holds ``speedrun.json``, or the folder
given. Only the stages that made the model count (pushing ``base/`` from a full run claims pretraining alone):

* ``speedrun.json``: tier, pipeline, device and GPU count, Python version, git commit, every stage's wall time;
* ``base/run_args.json``: pretraining's plan (steps, tokens a step, tokens seen);
* ``train/<stage>/losses.jsonl``: the steps every later stage took; what one step holds (tokens, conversations or
  questions) is in the tier's recipe (``recipes/<tier>/``), or in the stage's own ``run_args.json`` if it left one;
* ``corpus/``: the embedded corpus (``shard_*.jsonl``) or the ``SOURCE`` pretraining read;
* the stage's mixture in :mod:`nanochat_hf.tasks.mixtures` (midtraining, SFT) and the recipe's task (RL).

Without a run folder the card makes no claim about the training data (``datasets`` says only what ``--dataset``
gives).

**Results** (read tolerantly, see :func:`find_results_files`): ``--results FILE`` (repeatable), else ``eval_*.json``
in the model folder (what ``nanochat-hf eval`` writes), every ``*result*.json`` in the model folder and the folder
that holds it, and ``results/**/*.json`` in the model folder (lighteval's layout). Formats: ``nanochat-hf eval``'s
own (its summary numbers: CORE, bits per byte, each chat task's accuracy and reply format, ChatCORE where every one
of its tasks ran), lighteval's ``{"results": {"suite|task|shots": {"metric": value}}}``, a nested
``{"task": {"metric": value}}`` or a flat ``{"task": value}`` mapping. ``*_stderr``, lighteval's aggregate ``all``
and its config sections are skipped; a file that is not JSON or holds no number is skipped with a warning. The
``model-index`` lists each result under lighteval's task name (``core|0``, ``chat:gsm8k|0``,
``chat_cpu:arithmetic|0``; ours where lighteval has none: ``ChatCORE``, ``bits_per_byte``) and the Hub task type
(``multiple-choice`` for the lettered tasks, ``text-generation`` for the rest).

**The report card** (``--report FILE``, else ``report.md`` in the run folder, the model folder, beside it or in
``report/`` beside it) is published without its local pieces: the run folder's path, the stage logs' tails (local
commands, warnings), carriage-return progress-bar residue; its plots are copied to ``report/`` and linked
relatively; any absolute path left is replaced.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..evaluation.chatcore import CHATCORE, CHATCORE_CAT

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parents[1]
CHECKOUT_DIR = PACKAGE_DIR.parent
DASH = "—"
MULTIPLE_CHOICE, TEXT_GENERATION = "multiple-choice", "text-generation"  # the Hub's task ids
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg")
# the model folder of each training stage, as the speedrun names them
STAGE_OF_MODEL = {"base": "pretrain", "mid": "midtrain", "sft": "sft", "rl": "rl"}
_SKIPPED_SECTIONS = {"config_general", "config_tasks", "versions", "summary_tasks", "summary_general", "details",
                     "hashes", "config", "args"}


# ---------------------------------------------------------------------------------------------------------------
# Evaluation results


@dataclass(frozen=True)
class Benchmark:
    name: str  # lighteval's task name; ours where lighteval has none
    label: str
    task_type: str
    dataset: str  # the Hub dataset id where there is one
    config: str | None = None
    split: str | None = None


def _chat(key: str, label: str, kind: str, dataset: str, config: str | None = None, suite: str = "chat") -> Benchmark:
    return Benchmark(f"{suite}:{key}|0", label, kind, dataset, config, "test")


# Keyed by the normalised task name ("cpu:" first for the CPU tier's offline tasks, which lighteval names chat_cpu:)
BENCHMARKS: dict[str, Benchmark] = {
    # DCLM's 22 tasks from nanochat's eval bundle (no Hub dataset), scored by loss or exact continuation
    "core": Benchmark("core|0", "CORE", TEXT_GENERATION, "core"),
    "arceasy": _chat("arc_easy", "ARC-Easy", MULTIPLE_CHOICE, "allenai/ai2_arc", "ARC-Easy"),
    "arcchallenge": _chat("arc_challenge", "ARC-Challenge", MULTIPLE_CHOICE, "allenai/ai2_arc", "ARC-Challenge"),
    "mmlu": _chat("mmlu", "MMLU", MULTIPLE_CHOICE, "cais/mmlu", "all"),
    "gsm8k": _chat("gsm8k", "GSM8K", TEXT_GENERATION, "openai/gsm8k", "main"),
    "humaneval": _chat("humaneval", "HumanEval", TEXT_GENERATION, "openai/openai_humaneval"),
    "spellingbee": _chat("spellingbee", "SpellingBee", TEXT_GENERATION, "spellingbee"),
    "cpu:arithmetic": _chat("arithmetic", "Arithmetic", TEXT_GENERATION, "arithmetic", suite="chat_cpu"),
    "cpu:simplespelling": _chat("simplespelling", "SimpleSpelling", TEXT_GENERATION, "simplespelling",
                                suite="chat_cpu"),
    "cpu:spellingbee": _chat("spellingbee", "SpellingBee", TEXT_GENERATION, "spellingbee", suite="chat_cpu"),
    # computed by `nanochat-hf eval` from the tasks above; lighteval has no task of their own
    "chatcore": Benchmark(CHATCORE, CHATCORE, TEXT_GENERATION, "chatcore"),
    "chatcorecat": Benchmark(CHATCORE_CAT, CHATCORE_CAT, MULTIPLE_CHOICE, "chatcore_cat"),
    "bitsperbyte": Benchmark("bits_per_byte", "bits per byte (validation split of the pretraining text)",
                             TEXT_GENERATION, "pretraining-text", split="validation"),
}
_BY_NAME = {b.name: b for b in BENCHMARKS.values()}
# `nanochat-hf eval`'s per-task keys -> lighteval's metric names
_CHAT_METRICS = {"accuracy": "acc", "ends_turn_rate": "ends_turn", "calculator_rate": "calculator"}


@dataclass(frozen=True)
class TaskResult:
    task: str  # lighteval's task name where known ("chat:gsm8k|0"), else as found ("sft/mmlu")
    metric: str
    value: float
    source: str  # the file it came from
    items: int | None = None  # how many items the evaluation scored, where it says


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def benchmark(task: str) -> Benchmark | None:
    return _BY_NAME.get(task)


def _lighteval_name(key: str) -> str:
    """lighteval's results key ("suite|task|shots" or "task|shots") as its task name ("task|shots")."""
    parts = key.split("|")
    if len(parts) == 3 and parts[2].isdigit():
        return "|".join(parts[1:])
    return key


def find_report(model_dir: Path, run_dir: Path | None = None) -> Path | None:
    candidates = [run_dir / "report.md"] if run_dir is not None else []
    candidates += [model_dir / "report.md", model_dir.parent / "report.md", model_dir.parent / "report" / "report.md"]
    return next((c for c in candidates if c.is_file()), None)


def find_results_files(model_dir: Path) -> list[Path]:
    found: list[Path] = sorted(p for p in model_dir.glob("eval_*.json") if p.is_file())
    for folder in (model_dir, model_dir.parent):
        found += sorted(p for p in folder.glob("*.json") if "result" in p.name.lower() and p.is_file())
    found += sorted(p for p in (model_dir / "results").rglob("*.json") if p.is_file())
    unique: list[Path] = []
    for path in found:
        if path.resolve() not in {u.resolve() for u in unique}:
            unique.append(path)
    return unique


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _numeric_leaves(node, path: tuple[str, ...]) -> Iterable[tuple[tuple[str, ...], float]]:
    if isinstance(node, dict):
        for key, value in node.items():
            key = str(key)
            if key in _SKIPPED_SECTIONS or key == "all" or key.endswith("stderr"):
                continue
            yield from _numeric_leaves(value, path + (key,))
    elif _number(node) is not None:
        yield path, float(node)


def _nanochat_eval_results(data: dict, source: str) -> list[TaskResult]:
    """The summary numbers of a `nanochat-hf eval` results file, under lighteval's names."""
    out = []
    core, bpb, chat = data.get("core"), data.get("bpb"), data.get("chat")
    if isinstance(core, dict) and _number(core.get("core_metric")) is not None:
        examples = core.get("examples")
        items = sum(v for v in examples.values() if isinstance(v, int)) if isinstance(examples, dict) else None
        out.append(TaskResult("core|0", "centered", float(core["core_metric"]), source, items or None))
    if isinstance(bpb, dict) and _number(bpb.get("val_bpb")) is not None:
        tokens = bpb.get("tokens_read", {}).get("val") if isinstance(bpb.get("tokens_read"), dict) else None
        out.append(TaskResult("bits_per_byte", "bpb", float(bpb["val_bpb"]), source, tokens))
    if isinstance(chat, dict):
        prefix = "cpu:" if data.get("tier") == "cpu" else ""
        for name, result in (chat.get("tasks") or {}).items():
            if not isinstance(result, dict):
                continue
            known = BENCHMARKS.get(prefix + _norm(str(name))) or BENCHMARKS.get(_norm(str(name)))
            task = known.name if known is not None else str(name)
            items = result.get("examples") if isinstance(result.get("examples"), int) else None
            for key, metric in _CHAT_METRICS.items():
                if _number(result.get(key)) is not None:
                    out.append(TaskResult(task, metric, float(result[key]), source, items))
        for name, key in ((CHATCORE, "chatcore"), (CHATCORE_CAT, "chatcore_cat")):
            if _number(chat.get(key)) is not None:  # None where not every task of its was evaluated
                out.append(TaskResult(name, key, float(chat[key]), source))
    return out


def read_results(paths: Sequence[Path]) -> list[TaskResult]:
    """Every numeric result in `paths` (formats in the module docstring), the first of each task and metric;
    unreadable files are skipped."""
    results: list[TaskResult] = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            logger.warning("skipping results file %s: %s", path, err)
            continue
        if isinstance(data, dict) and "stage" in data and ({"core", "bpb", "chat"} & data.keys()):
            nanochat = _nanochat_eval_results(data, str(path))
            if not nanochat:
                logger.warning("skipping results file %s: it holds no finished evaluation", path)
            results += nanochat
            continue
        if isinstance(data, dict) and isinstance(data.get("results"), dict):
            data = data["results"]  # lighteval
        found = list(_numeric_leaves(data, ()))
        if not found:
            logger.warning("skipping results file %s: it holds no numeric result", path)
        for keys, value in found:
            if len(keys) == 1:
                task, metric = _lighteval_name(keys[0]), "score"
            else:
                task = "/".join([*keys[:-2], _lighteval_name(keys[-2])])
                metric = keys[-1]
            results.append(TaskResult(task=task, metric=metric, value=value, source=str(path)))
    unique: dict[tuple[str, str], TaskResult] = {}
    for r in results:
        unique.setdefault((r.task, r.metric), r)
    return list(unique.values())


def eval_results_for_card(results: Sequence[TaskResult]) -> list:
    """The `model-index` entries: one per measured result, under lighteval's task name and the Hub's task type."""
    from huggingface_hub import EvalResult

    cards = []
    for r in results:
        known = benchmark(r.task)
        cards.append(EvalResult(
            task_type=known.task_type if known else TEXT_GENERATION, task_name=r.task,
            dataset_type=known.dataset if known else r.task, dataset_name=known.label if known else r.task,
            dataset_config=known.config if known else None, dataset_split=known.split if known else None,
            metric_type=r.metric, metric_name=r.metric, metric_value=round(r.value, 4),
        ))
    return cards


# ---------------------------------------------------------------------------------------------------------------
# The run's records


@dataclass(frozen=True)
class DataSource:
    description: str  # markdown
    hub_id: str | None = None  # the Hub dataset, where the data is one


@dataclass(frozen=True)
class StageRecord:
    stage: str
    data: tuple[DataSource, ...]
    steps: int | None
    per_step: int | None  # what one optimizer step holds, in `unit`
    unit: str  # "tokens", "conversations" or "questions"
    seen: int | None  # steps x per_step (pretraining: its plan's total_tokens)
    seconds: float | None
    subset: str = ""  # the part of the data the recipe kept (max_rows, max_examples)
    note: str = ""  # e.g. RL's samples per question


@dataclass(frozen=True)
class RunRecords:
    tier: str | None
    pipeline: str | None
    device: str | None
    gpus: int | None
    gpu_name: str | None
    python: str | None
    started: str | None
    commit: str | None
    dirty: bool | None
    corpus: DataSource | None
    stages: tuple[StageRecord, ...]  # the stages that made the model, in order
    seconds: float  # corpus + tokenizer + those stages
    eval_seconds: float  # the evaluations of those stages' models
    timed: tuple[str, ...]  # the speedrun.json stages whose seconds are summed into `seconds`

    @property
    def datasets(self) -> list[str]:
        """The Hub datasets the model was trained on (the embedded corpus and generated tasks are none)."""
        ids = [source.hub_id for s in self.stages for source in s.data if source.hub_id]
        return list(dict.fromkeys(ids))

    @property
    def hardware(self) -> str:
        if self.device == "cpu" or not self.gpus:
            return "CPU only (no GPU)"
        name = f"{self.gpu_name} " if self.gpu_name else ""
        return f"{self.gpus} {name}GPU" + ("s" if self.gpus > 1 else "")


def find_run_dir(model_dir: Path) -> Path | None:
    """The speedrun folder the model folder belongs to: its parent, when that holds speedrun.json."""
    parent = model_dir.resolve().parent
    return parent if (parent / "speedrun.json").is_file() else None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _read_recipe(path: Path) -> dict:
    import yaml

    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return recipe if isinstance(recipe, dict) else {}


def _last_step(path: Path) -> int | None:
    steps = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                steps.append(int(json.loads(line)["step"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # an interrupted run may leave a half-written last line
    return max(steps, default=None)


def _hub_link(hub_id: str, label: str | None = None) -> str:
    return f"[{label or hub_id}](https://huggingface.co/datasets/{hub_id})"


def _looks_like_hub_id(text: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", text)) and not Path(text).exists()


def corpus_source(run_dir: Path, python: str | None) -> DataSource | None:
    """What pretraining read: corpus/SOURCE (a Hub id or a local path, never published), else the embedded corpus
    the speedrun wrote as shard_*.jsonl."""
    folder = run_dir / "corpus"
    source = folder / "SOURCE"
    if source.is_file():
        named = source.read_text(encoding="utf-8").strip()
        if _looks_like_hub_id(named):
            return DataSource(_hub_link(named), named)
        return DataSource("a local text corpus (not published)")
    if any(folder.glob("shard_*.jsonl")):
        version = f" {python}" if python else ""
        return DataSource("the embedded corpus: CPython's own documentation (the pydoc topics and the standard "
                          f"library's docstrings) of Python{version}, under the PSF License; no download "
                          "(`nanochat_hf/data/embedded.py`)")
    return None


HUB_LABELS = {"smoltalk": "SmolTalk", "mmlu": "MMLU", "gsm8k": "GSM8K", "arc_easy": "ARC-Easy",
              "arc_challenge": "ARC-Challenge", "humaneval": "HumanEval"}


def _task_source(task: str, tier: str) -> DataSource:
    from ..tasks.mixtures import _REPOS as HUB_REPOS

    words = "words of the Python documentation" if tier == "cpu" else "nanochat's word list (words_alpha.txt)"
    generated = {
        "identity": "identity conversations (the project's packaged personality)",
        "arithmetic": "Arithmetic with calculator calls (generated by the project)",
        "simplespelling": f"SimpleSpelling (generated from {words})",
        "spellingbee": f"SpellingBee (generated from {words})",
    }
    if task in HUB_REPOS:
        return DataSource(_hub_link(HUB_REPOS[task], HUB_LABELS.get(task)), HUB_REPOS[task])
    return DataSource(generated.get(task, task))


def mixture_sources(stage: str, tier: str) -> tuple[DataSource, ...]:
    """The tasks of a stage's mixture (mixtures.mixture_parts), each once, with its repeats and row counts."""
    from ..tasks.mixtures import mixture_parts

    parts = mixture_parts(stage, tier)
    sources = []
    for task in dict.fromkeys(task for task, _, _ in parts):
        mine = [(split, rows) for t, split, rows in parts if t == task]
        source = _task_source(task, tier)
        extra = [f"{mine[0][1]:,} rows"] if mine[0][1] is not None else []
        extra += [f"{mine[0][0]} split"] if mine[0][0] != "train" else []
        extra += [f"x{len(mine)}"] if len(mine) > 1 else []
        sources.append(DataSource(", ".join([source.description, *extra]), source.hub_id))
    return tuple(sources)


def _seconds(entry) -> float | None:
    return float(entry["seconds"]) if isinstance(entry, dict) and _number(entry.get("seconds")) is not None else None


def _stage_record(stage: str, run_dir: Path, log: dict, corpus: DataSource | None) -> StageRecord:
    from ..speedrun import MODELS, recipe_file

    tier, pipeline = str(log.get("tier")), str(log.get("pipeline"))
    timings = log.get("stages") if isinstance(log.get("stages"), dict) else {}
    seconds = _seconds(timings.get(stage))
    steps = _last_step(run_dir / "train" / stage / "losses.jsonl")
    own = _read_json(run_dir / MODELS[stage] / "run_args.json") or {}
    plan = own.get("plan") if isinstance(own.get("plan"), dict) and own.get("stage") == stage else {}
    recipe = _read_recipe(recipe_file(tier, pipeline, stage)) if stage != "pretrain" else {}
    limit = recipe.get("max_examples" if stage == "rl" else "max_rows")
    subset = ""
    if isinstance(limit, int) and limit > 0:
        subset = f"trained on the first {limit:,} {'questions' if stage == 'rl' else 'conversations of the shuffled mixture'}"
    note = ""
    if stage == "pretrain":
        data = (corpus,) if corpus else (DataSource(DASH),)
        steps = plan.get("num_iterations", steps)
        per_step, unit = plan.get("total_batch_size"), "tokens"
        seen = plan.get("total_tokens")
    elif stage == "rl":
        task = str(recipe.get("task", "gsm8k"))
        data = (_task_source(task, tier),)
        per_step, unit = recipe.get("examples_per_step"), "questions"
        if isinstance(recipe.get("num_samples"), int):
            note = f"{recipe['num_samples']} replies sampled per question"
        seen = None
    else:
        mixture = stage if (stage, pipeline) != ("sft", "2026") else "sft-2026"
        data = mixture_sources(mixture, tier)
        if (stage, pipeline) == ("sft", "2025"):
            per_step, unit = recipe.get("target_examples_per_step"), "conversations"
        else:
            # HEAD's SFT inherits the base run's batch unless its recipe sets one
            base_plan = (_read_json(run_dir / "base" / "run_args.json") or {}).get("plan") or {}
            per_step, unit = recipe.get("total_batch_size", base_plan.get("total_batch_size")), "tokens"
        per_step = plan.get("total_batch_size", per_step)
        seen = plan.get("total_tokens")
    per_step = per_step if isinstance(per_step, int) else None
    steps = steps if isinstance(steps, int) else None
    if not isinstance(seen, int):
        seen = steps * per_step if steps is not None and per_step is not None else None
    return StageRecord(stage, data, steps, per_step, unit, seen, seconds, subset, note)


def read_run(run_dir: Path, model_dir: Path) -> RunRecords:
    """The records of the speedrun folder `run_dir` that describe the model in `model_dir` (one of its model
    folders: base, mid, sft, rl)."""
    from ..speedrun import MODELS, PIPELINES

    log = _read_json(run_dir / "speedrun.json")
    if log is None:
        raise ValueError(f"{run_dir / 'speedrun.json'} is missing or not a JSON object: pass the folder "
                         "`nanochat-hf speedrun --run-dir` wrote")
    model = model_dir.resolve().name
    if model_dir.resolve().parent != run_dir.resolve() or model not in STAGE_OF_MODEL:
        raise ValueError(f"{model_dir} is not one of the model folders ({', '.join(STAGE_OF_MODEL)}) of the run "
                         f"folder {run_dir}: pass its base/, mid/, sft/ or rl/")
    pipeline = str(log.get("pipeline"))
    timings = log.get("stages") if isinstance(log.get("stages"), dict) else {}
    order = [*PIPELINES.get(pipeline, ()), "rl"]
    target = STAGE_OF_MODEL[model]
    if target not in order:
        raise ValueError(f"{model_dir}: pipeline {pipeline} has no {target} stage")
    lineage = [s for s in order[:order.index(target) + 1] if s in timings or (run_dir / MODELS[s]).is_dir()]
    corpus = corpus_source(run_dir, log.get("python"))
    stages = tuple(_stage_record(s, run_dir, log, corpus) for s in lineage)
    timed = tuple(s for s in ("corpus", "tokenizer", *lineage) if _seconds(timings.get(s)) is not None)
    evals = [f"eval_{MODELS[s]}" for s in lineage]
    gpus = log.get("gpus")
    git = log.get("git") if isinstance(log.get("git"), dict) else {}
    return RunRecords(
        tier=log.get("tier"), pipeline=log.get("pipeline"), device=log.get("device"),
        gpus=gpus if isinstance(gpus, int) else None, gpu_name=log.get("gpu_name"), python=log.get("python"),
        started=log.get("started"), commit=git.get("commit"), dirty=git.get("dirty"), corpus=corpus, stages=stages,
        seconds=sum(_seconds(timings[s]) for s in timed),
        eval_seconds=sum(_seconds(timings.get(e)) or 0.0 for e in evals), timed=timed,
    )


# ---------------------------------------------------------------------------------------------------------------
# Publishing text: no local paths, no progress-bar residue

# tqdm's bar: "desc:  40%|████      | 1000/2500 [00:00<00:00, 1705.97 examples/s]"
_PROGRESS = re.compile(r"^(?P<desc>.*?)\s*\d{1,3}%\|.*\|\s*[\d.]+[kMGT]?/[\d.?]+[kMGT]?\s*\[")
# an absolute POSIX path of two or more parts, not inside a URL or a relative path
_ABSOLUTE = re.compile(r"(?<![\w.~/<>-])/(?:[\w.+@%-]+/)+[\w.+@%-]*")
LOCAL_PATH = "<local path>"


def _terminal_line(line: str) -> str:
    # what a terminal shows of a line that carriage returns redrew: its last non-empty segment
    segments = [s for s in line.split("\r") if s.strip()]
    return segments[-1] if segments else ""


def _collapse_progress(lines: list[str]) -> list[str]:
    """Of consecutive progress-bar lines with the same description, only the last (the bar's final state)."""
    out: list[str] = []
    previous = None
    for line in lines:
        match = _PROGRESS.match(line)
        desc = match.group("desc") if match else None
        if desc is not None and desc == previous and out:
            out[-1] = line
        else:
            out.append(line)
        previous = desc
    return out


def local_roots(run_dir: Path | None) -> dict[Path, str]:
    """The local folders whose paths a published text must not show, and what stands in for each."""
    roots = {Path(sys.prefix): "<python>", Path(sys.base_prefix): "<python>", CHECKOUT_DIR: "nanochat-hf",
             Path.home(): "~"}
    if run_dir is not None:
        roots[run_dir.resolve()] = "."
        roots[Path(run_dir).absolute()] = "."
    return {root: name for root, name in roots.items() if str(root) not in ("/", "")}


def clean_text(text: str, roots: Mapping[Path, str]) -> str:
    """`text` as it may be published: progress bars as they ended, `roots` replaced by their stand-ins and any
    other absolute path by <local path>."""
    lines = [_terminal_line(line) for line in text.replace("\r\n", "\n").split("\n")]
    text = "\n".join(_collapse_progress(lines))
    for root in sorted(roots, key=lambda p: len(str(p)), reverse=True):
        text = re.sub(r"(?<![\w.-])" + re.escape(str(root)) + r"(?![\w.+@%-])", lambda _, r=roots[root]: r, text)
    return _ABSOLUTE.sub(LOCAL_PATH, text)


def _fence(line: str) -> str | None:
    match = re.match(r"\s*(`{3,}|~{3,})", line)
    return match.group(1) if match else None


def publishable_report(text: str, roots: Mapping[Path, str]) -> str:
    """The report card without its local pieces: the run folder's path and the stage logs' tails (local commands,
    warnings and tracebacks); what is left cleaned by :func:`clean_text`."""
    out, fence, skipping = [], None, False
    for line in text.replace("\r\n", "\n").split("\n"):
        marker = _fence(line)
        if fence is None and line.startswith("## "):
            skipping = line.strip() == "## Stage logs"
        if not skipping and not (fence is None and line.startswith("- Run folder:")):
            out.append(line)
        if marker and fence is None:
            fence = marker
        elif marker and marker.startswith(fence) and line.strip() == marker:
            fence = None
    return clean_text("\n".join(out).rstrip() + "\n", roots)


_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def report_images(report: str, report_dir: Path) -> tuple[str, dict[str, Path]]:
    """The report with every local image linked as report/<name>, and those files by their new link. A link to an
    image that is not there is dropped (it would be broken, or show a local path)."""
    images: dict[str, Path] = {}

    def relink(match: re.Match) -> str:
        alt, target = match.groups()
        if re.match(r"[a-z]+://", target):
            return match.group(0)
        path = Path(target) if Path(target).is_absolute() else report_dir / target
        if not (path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES):
            return ""
        link = f"report/{path.name}"
        n = 1
        while link in images and images[link].resolve() != path.resolve():
            n += 1
            link = f"report/{path.stem}-{n}{path.suffix}"
        images[link] = path
        return f"![{alt}]({link})"

    return _IMAGE.sub(relink, report), images


# ---------------------------------------------------------------------------------------------------------------
# The card


def _demote_headings(markdown: str) -> str:
    # the report's own "# title" would otherwise outrank the card's sections
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        out.append("#" + line if line.startswith("#") and not fenced else line)
    return "\n".join(out)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _count(value: int | None, unit: str = "") -> str:
    return DASH if value is None else f"{value:,}" + (f" {unit}" if unit else "")


def training_section(run: RunRecords | None, vocab_size: int | None) -> list[str]:
    from ..evaluation.report import PIPELINE_NOTES, fmt_duration

    lines = ["## Training", ""]
    if run is None:
        return lines + ["No run records were found beside this checkpoint (a speedrun folder's `speedrun.json`), so "
                        "this card makes no claim about how it was trained.", ""]
    lines += ["From the run's own records: `speedrun.json`, pretraining's `base/run_args.json`, each stage's "
              "`train/<stage>/losses.jsonl` and the tier's recipes (`recipes/<tier>/`).", ""]
    pipeline = f", pipeline {run.pipeline} ({PIPELINE_NOTES[run.pipeline]})" if run.pipeline in PIPELINE_NOTES else ""
    lines.append(f"- Tier: `{run.tier or DASH}`{pipeline}")
    lines.append(f"- Stages: {' → '.join(s.stage for s in run.stages) or DASH}")
    lines.append(f"- Hardware: {run.hardware}")
    evals = f"; its evaluations took {fmt_duration(run.eval_seconds)} more" if run.eval_seconds else ""
    lines.append(f"- Wall time: {fmt_duration(run.seconds)} ({', '.join(run.timed) or DASH}){evals}")
    if run.corpus is not None:
        vocab = f", {vocab_size:,} tokens" if vocab_size else ""
        lines.append(f"- Tokenizer: BPE{vocab}, trained on the pretraining text")
    if run.started:
        lines.append(f"- Started: {run.started}")
    if run.commit:
        state = " (with uncommitted changes)" if run.dirty else ""
        lines.append(f"- Code: nanochat-hf at commit `{run.commit[:12]}`{state}")
    rows = []
    for s in run.stages:
        per_step = f" ({_count(s.per_step)} a step)" if s.per_step is not None else ""
        note = f"; {s.note}" if s.note else ""
        subset = f"; {s.subset}" if s.subset else ""
        rows.append(f"| {s.stage} | {'; '.join(d.description for d in s.data)}{subset} | {_count(s.steps)} | "
                    f"{_count(s.seen, s.unit)}{per_step}{note} | {fmt_duration(s.seconds)} |")
    lines += ["", "| Stage | Data | Steps | Seen | Wall time |", "|---|---|---|---|---|", *rows, ""]
    return lines


def evaluation_section(results: Sequence[TaskResult]) -> list[str]:
    if not results:
        return []
    lines = ["## Evaluation", "", "Measured on this checkpoint; tasks as lighteval names them (`evals/`).", "",
             "| Task | Metric | Value | Items |", "|---|---|---|---|"]
    # a "|" inside a cell, even in a code span, ends the cell unless escaped
    lines += [f"| `{_cell(r.task)}` | {r.metric} | {r.value:.4f} | {_count(r.items)} |" for r in results]
    return lines + ["", "Items: how many the evaluation scored (bits per byte: validation tokens); a smoke run "
                    "scores only a few, so its numbers are noise.", ""]


def build_model_card(repo_id: str, config: dict, num_params: int, results: Sequence[TaskResult],
                     run: RunRecords | None, report: str | None, datasets: Sequence[str] | None, license: str,
                     space_id: str | None, roots: Mapping[Path, str]):
    """The ModelCard: metadata (the Hub datasets the run used unless `datasets` says otherwise, the measured
    results as model-index) and the body (use, training, architecture, evaluation, the cleaned report)."""
    from huggingface_hub import ModelCard, ModelCardData

    name = repo_id.split("/")[-1]
    used = list(datasets) if datasets is not None else (run.datasets if run is not None else [])
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        language=["en"],
        tags=["nanochat", "nanochat-hf", "custom_code", "conversational", "text-generation"],
        datasets=used or None,
        model_name=name,
        eval_results=eval_results_for_card(results) or None,
    )
    layers, width = config.get("num_hidden_layers"), config.get("hidden_size")
    lines = [
        f"# {name}",
        "",
        f"A nanochat model (d{layers}, {num_params:,} parameters) trained with nanochat-hf, "
        "[nanochat](https://github.com/karpathy/nanochat)'s recipe rebuilt on the Hugging Face stack.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)',
        'messages = [{"role": "user", "content": "Why is the sky blue?"}]',
        "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\")",
        "out = model.generate(**ids, max_new_tokens=128, do_sample=True, temperature=0.8, top_k=50)",
        "print(tokenizer.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "The code (`configuration_nanochat.py`, `modeling_nanochat.py`) ships with the weights and imports only torch "
        "and transformers, hence `trust_remote_code=True`. The chat template renders nanochat's special tokens.",
        "",
        *training_section(run, config.get("vocab_size")),
        "## Architecture",
        "",
        "| field | value |",
        "|---|---|",
        f"| generation | {config.get('generation', '?')} |",
        f"| layers | {layers} |",
        f"| hidden size | {width} |",
        f"| attention heads / kv heads | {config.get('num_attention_heads')} / {config.get('num_key_value_heads')} |",
        f"| context | {config.get('max_position_embeddings')} |",
        f"| vocabulary | {config.get('vocab_size')} |",
        f"| parameters | {num_params:,} |",
    ]
    if space_id:
        lines += ["", f"Chat with it in the Space [{space_id}](https://huggingface.co/spaces/{space_id})."]
    lines += ["", *evaluation_section(results)]
    if report:
        lines += ["## Report card", "", _demote_headings(report.strip())]
    body = clean_text("\n".join(lines).rstrip() + "\n", roots)
    # not from_template: jinja would read "{{" in the report as its own syntax
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
