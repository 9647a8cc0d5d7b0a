"""CORE as lighteval 0.13 custom tasks (`evals/core.py` exposes :func:`core_tasks_table` as ``TASKS_TABLE``).

Each bundle task becomes ``core:<label>``; ``core|0`` runs them all. The prompt function builds nanochat's
few-shot prompt itself (nanochat's draw, not lighteval's), so always request ``|0``.

lighteval's only hook into the model is a loglikelihood request: one context string and continuation strings,
which it encodes separately (``encode(context, add_special_tokens=True)`` -- BOS first with our tokenizer -- plus
``encode(continuation)``, after moving the context's trailing whitespace onto each continuation), returning per
continuation the summed log-probability and whether greedy decoding reproduces it. To make that score exactly
nanochat's tokens, the prompt function tokenizes nanochat's prompts with the model's tokenizer and cuts them at
token boundaries:

* context = the token prefix shared by all of the example's sequences (and ending at or before every span);
* per sequence a "full" continuation (the rest of the sequence) and, when its span starts later than the context
  ends (schema's differing contexts, or whitespace lighteval moved), a "base" continuation that stops where the
  span starts. Both are scored from the same context, so ``logprob(full) - logprob(base)`` is exactly the span's
  summed log-probability, and dividing by the span length gives nanochat's mean.

It then checks that lighteval's separate encodings reproduce nanochat's tokens; an example where they cannot
(a span boundary inside a multi-byte character, a special-token string in the text) is still scored but counted
in the ``token_mismatch`` metric, which is 0 on well-formed data.

The prompt function needs the tokenizer. It is, first match wins: the one given to :func:`set_tokenizer`,
``$NANOCHAT_CORE_TOKENIZER``, or the ``tokenizer=``/``model_name=`` of the lighteval command line being run.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from lighteval.metrics.metrics_sample import SampleLevelComputation
from lighteval.metrics.utils.metric_utils import MetricGrouping
from lighteval.models.model_output import ModelResponse
from lighteval.tasks.lighteval_task import LightevalTaskConfig
from lighteval.tasks.requests import Doc, SamplingMethod
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .bundle import CoreTask, bundle_fingerprint, cache_dir, load_core_tasks, load_task_data, resolve_bundle
from .core import CoreScoringError, ScoringRequest, build_requests, centered, common_length, verdict

TASK_PREFIX = "core:"
TOKENIZER_ENV = "NANOCHAT_CORE_TOKENIZER"
MAX_PER_TASK_ENV = "NANOCHAT_CORE_MAX_PER_TASK"

_tokenizer: PreTrainedTokenizerBase | None = None


def set_tokenizer(tokenizer: PreTrainedTokenizerBase | str | None) -> None:
    """Tokenizer (or its folder / repo id) the CORE prompt functions use; for lighteval's Python API."""
    global _tokenizer
    _tokenizer = AutoTokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, str) else tokenizer


def _model_args_from_argv(argv: list[str]) -> dict[str, str]:
    """``tokenizer``/``model_name`` from the model-args argument of ``lighteval accelerate`` (string or YAML)."""
    for arg in argv[1:]:
        if arg.endswith((".yaml", ".yml")) and os.path.isfile(arg):
            import yaml

            params = (yaml.safe_load(Path(arg).read_text()) or {}).get("model_parameters", {}) or {}
            return {k: str(params[k]) for k in ("tokenizer", "model_name") if params.get(k)}
        if "model_name=" in arg:
            # top-level `key=value` pairs; values such as generation_parameters={...} may hold commas of their own
            pairs = re.findall(r"(?:^|,)\s*(\w+)=((?:\{[^}]*\}|[^,])*)", arg)
            return {k: v for k, v in pairs if k in ("tokenizer", "model_name") and v}
    return {}


def resolve_tokenizer() -> PreTrainedTokenizerBase:
    global _tokenizer
    if _tokenizer is None:
        args = _model_args_from_argv(sys.argv)
        name = os.environ.get(TOKENIZER_ENV) or args.get("tokenizer") or args.get("model_name")
        if not name:
            raise RuntimeError(
                "the CORE tasks need the model's tokenizer to cut nanochat's prompts at token boundaries, and none "
                f"was found: run them from `lighteval accelerate \"model_name=...\"`, set ${TOKENIZER_ENV}, or call "
                "nanochat_hf.evaluation.lighteval_core.set_tokenizer()"
            )
        _tokenizer = AutoTokenizer.from_pretrained(name)
    return _tokenizer


def max_per_task() -> int:
    raw = os.environ.get(MAX_PER_TASK_ENV, "-1")
    try:
        return int(raw)
    except ValueError as e:
        raise ValueError(f"${MAX_PER_TASK_ENV}={raw!r} is not an integer (-1 = all items)") from e


# ---------------------------------------------------------------------------------------------------------------
# Request -> lighteval Doc


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def lighteval_view(tokenizer: PreTrainedTokenizerBase, request) -> tuple[str, list[str], dict]:
    """Context, continuations and the recipe (``full``/``base`` continuation per sequence, span lengths) that
    turn lighteval's per-continuation log-probabilities into nanochat's verdict. See the module docstring."""
    seqs, starts = request.sequences, request.starts
    cut = min(common_length(seqs), *starts)
    context = _decode(tokenizer, seqs[0][1:cut])
    moved = context[len(context.rstrip()):]  # lighteval re-attaches this to every continuation
    choices, full, base = [], [], []
    base_index: dict[tuple[int, ...], int] = {}
    for seq, start in zip(seqs, starts, strict=True):
        full.append(len(choices))
        choices.append(_decode(tokenizer, seq[cut:]))
        key = tuple(seq[cut:start])
        if not key and not moved:
            base.append(None)
            continue
        if key not in base_index:  # one base continuation per distinct prefix (MC: one shared, or none)
            base_index[key] = len(choices)
            choices.append(_decode(tokenizer, list(key)))
        base.append(base_index[key])
    # what lighteval will actually score, vs nanochat's tokens
    context_ids = tokenizer.encode(context.rstrip(), add_special_tokens=True)
    scored = [context_ids + tokenizer.encode(moved + c, add_special_tokens=False) for c in choices]
    exact = all(scored[f] == seq for f, seq in zip(full, seqs, strict=True)) and all(
        b is None and len(context_ids) == start or b is not None and scored[b] == seq[:start]
        for b, seq, start in zip(base, seqs, starts, strict=True)
    )
    recipe = {
        "task_type": request.task_type,
        "gold": request.gold,
        "full": full,
        "base": base,
        "lengths": [e - s for s, e in zip(starts, request.ends, strict=True)],
        "exact": exact,
    }
    return context, choices, recipe


@functools.lru_cache(maxsize=64)
def _pool(bundle_dir: str, label: str, limit: int) -> tuple[CoreTask, list[dict], int]:
    task = next(t for t in load_core_tasks(Path(bundle_dir)) if t.label == label)
    data, num_eval = load_task_data(Path(bundle_dir), task, limit)
    return task, data, num_eval


def core_prompt(line: dict, task_name: str, *, bundle_dir: str, label: str, limit: int) -> Doc:
    """lighteval prompt function: row ``{"index": i}`` of the prepared dataset -> the Doc of pool item i."""
    task, data, _ = _pool(bundle_dir, label, limit)
    tokenizer = resolve_tokenizer()
    index = int(line["index"])
    try:
        (request,) = build_requests(task, data, tokenizer, [index])
    except CoreScoringError as e:
        raise CoreScoringError(f"{label} item {index}: {e}") from e
    context, choices, recipe = lighteval_view(tokenizer, request)
    gold = request.gold if request.gold is not None else 0
    return Doc(task_name=task_name, query=context, choices=choices, gold_index=recipe["full"][gold],
               specific=recipe)


# ---------------------------------------------------------------------------------------------------------------
# Metric


class CoreExampleScore(SampleLevelComputation):
    """Per example: nanochat's verdict (acc and centered share it; they differ in the corpus aggregation) and
    whether lighteval scored exactly nanochat's tokens."""

    def compute(self, doc: Doc, model_response: ModelResponse, **kwargs) -> dict[str, float]:
        if doc.fewshot_samples:
            raise ValueError(
                f"{doc.task_name}: CORE tasks build nanochat's few-shot prompt themselves; request them with |0 "
                f"(e.g. 'core|0' or 'core:hellaswag|0')"
            )
        recipe = doc.specific
        logprobs = model_response.logprobs
        means, greedy = [], []
        for f, b, n in zip(recipe["full"], recipe["base"], recipe["lengths"], strict=True):
            span = logprobs[f] - (logprobs[b] if b is not None else 0.0)
            means.append(-span / n if n else float("nan"))
            greedy.append(bool(model_response.argmax_logits_eq_gold[f]))
        request = ScoringRequest(recipe["task_type"], [], [], [], recipe["gold"])
        correct = float(verdict(request, means, greedy).correct)
        return {"acc": correct, "centered": correct, "token_mismatch": 0.0 if recipe["exact"] else 1.0}


def _centered_mean(baseline: float):
    def aggregate(values: list[float]) -> float:
        return centered(float(np.mean(values)), baseline)

    aggregate.__name__ = f"centered_mean_{baseline:g}"
    return aggregate


def core_metric(baseline_percent: float) -> MetricGrouping:
    return MetricGrouping(
        metric_name=["acc", "centered", "token_mismatch"],
        higher_is_better={"acc": True, "centered": True, "token_mismatch": False},
        category=SamplingMethod.LOGPROBS,
        sample_level_fn=CoreExampleScore(),
        corpus_level_fn={"acc": np.mean, "centered": _centered_mean(baseline_percent), "token_mismatch": np.mean},
    )


# ---------------------------------------------------------------------------------------------------------------
# Task table


def _prepare_rows(root: Path, label: str, num_eval: int) -> Path:
    """A one-file dataset of item indices that ``datasets.load_dataset(folder)`` reads; written once, atomically."""
    folder = root / label
    if (folder / "items.jsonl").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{label}-", dir=root))
    (staging / "items.jsonl").write_text("".join(json.dumps({"index": i}) + "\n" for i in range(num_eval)))
    try:
        os.replace(staging, folder)
    except OSError:
        if not (folder / "items.jsonl").is_file():  # another rank won the race: fine
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def core_tasks_table(bundle: str | os.PathLike | None = None, limit: int | None = None) -> list[LightevalTaskConfig]:
    """One lighteval task per bundle task, named ``core:<label>``. `limit` (default ``$NANOCHAT_CORE_MAX_PER_TASK``,
    -1 = all) is nanochat's max_per_task: it also shapes the few-shot pool, so use it rather than --max-samples."""
    bundle_dir = resolve_bundle(bundle)
    limit = max_per_task() if limit is None else limit
    # the prepared folders' path enters lighteval's sample-cache key, so a new bundle or limit is never stale
    root = cache_dir() / "lighteval_core" / f"{bundle_fingerprint(bundle_dir)}-n{limit}"
    table = []
    for task in load_core_tasks(bundle_dir):
        _, _, num_eval = _pool(str(bundle_dir), task.label, limit)
        table.append(
            LightevalTaskConfig(
                name=f"{TASK_PREFIX}{task.label}",
                prompt_function=functools.partial(core_prompt, bundle_dir=str(bundle_dir), label=task.label,
                                                  limit=limit),
                hf_repo=str(_prepare_rows(root, task.label, num_eval)),
                hf_subset="default",
                hf_avail_splits=["train"],
                evaluation_splits=["train"],
                few_shots_split=None,
                metrics=[core_metric(task.random_baseline)],
                version=0,
            )
        )
    return table
