"""CORE (DCLM's 22-task ensemble) scored the way nanochat scores it, with batched forward passes.

Per example (nanochat-spec.md §5.1):

* prompts: `num_fewshot` other items of the pool, drawn with ``Random(1234 + idx)``, each rendered as its solved
  form and followed by a blank line, then the item itself. Multiple choice: one prompt per choice; schema: one
  per context option (same continuation); language modelling: the prompt without (stripped) and with the
  continuation.
* tokens: BOS + the prompt encoded as ordinary text.
* span: multiple choice, what follows the token prefix common to all choices; schema, the token suffix common to
  all options; language modelling, what follows the without-continuation prompt.
* verdict: MC/schema pick the option with the lowest mean cross-entropy over its span (Python's ``min`` and
  ``list.index``, so NaN behaves as in nanochat); LM is right iff the greedy prediction reproduces every span token.

Accuracy per task, centered by the task's random baseline; CORE is the mean of the centered accuracies.

The batched scorer packs the sequences of several examples into one right-padded forward pass (a causal model's
earlier positions never see the padding), runs the prefix an example's sequences share once on a KV cache, and
computes logits only at the positions a span needs.
"""

from __future__ import annotations

import inspect
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from ..inference.engine import KVCache
from .bundle import CoreTask, load_core_tasks, load_task_data, resolve_bundle
from .progress import task_bar

FEWSHOT_SEED = 1234


class CoreScoringError(ValueError):
    """An example cannot be scored as nanochat would (its prompt breaks one of nanochat's assumptions)."""


# ---------------------------------------------------------------------------------------------------------------
# Prompts (nanochat renders these with Jinja; str() matches how Jinja prints a field)


def fewshot_examples(data: list[dict], idx: int, num_fewshot: int) -> list[dict]:
    if num_fewshot <= 0:
        return []
    others = [i for i in range(len(data)) if i != idx]
    return [data[i] for i in random.Random(FEWSHOT_SEED + idx).sample(others, num_fewshot)]


def render_prompts(item: dict, task_type: str, delimiter: str, fewshot: list[dict]) -> list[str]:
    """nanochat's prompts for one item: MC one per choice, schema one per context option, LM [without, with]."""
    if task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]
    if task_type == "language_modeling":
        shots = "".join(f"{str(ex['context']).strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        without = f"{shots}{str(item['context']).strip()}{delimiter}"
        return [without.strip(), f"{without}{item['continuation']}"]
    raise CoreScoringError(f"unsupported task type {task_type!r}")


# ---------------------------------------------------------------------------------------------------------------
# Token spans


@dataclass
class ScoringRequest:
    """One example as token sequences (BOS first) and the span [start, end) of each that is scored."""

    task_type: str
    sequences: list[list[int]]
    starts: list[int]
    ends: list[int]
    gold: int | None = None


def common_length(sequences: list[list[int]], from_end: bool = False) -> int:
    """Length of the token prefix (or suffix) shared by all sequences."""
    shortest = min(len(s) for s in sequences)
    for i in range(shortest):
        pos = -1 - i if from_end else i
        token = sequences[0][pos]
        if any(s[pos] != token for s in sequences):
            return i
    return shortest


def encode_batch(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """BOS + each text encoded as nanochat does: special-token strings in the text are ordinary text."""
    ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [[tokenizer.bos_token_id, *row] for row in ids]


def make_request(
    task: CoreTask, prompts: list[str], tokens: list[list[int]], gold: int | None, max_seq_len: int | None = None
) -> ScoringRequest:
    if task.task_type == "multiple_choice":
        start = common_length(tokens)
        starts, ends = [start] * len(tokens), [len(t) for t in tokens]
    elif task.task_type == "schema":
        suffix = common_length(tokens, from_end=True)
        ends = [len(t) for t in tokens]
        starts = [e - suffix for e in ends]
    else:
        without, with_ = tokens
        if not (len(without) < len(with_) and with_[: len(without)] == without):
            raise CoreScoringError(
                f"{task.label}: the prompt without its continuation does not tokenize to a prefix of the prompt "
                f"with it ({prompts[0][-40:]!r} | {prompts[1][len(prompts[0]) - 40:]!r})"
            )
        tokens, starts, ends = [with_], [len(without)], [len(with_)]
    if max_seq_len is not None:
        # nanochat's crop for models with a context limit: keep the last max_seq_len tokens, shift the spans
        cropped = [max(0, len(t) - max_seq_len) for t in tokens]
        tokens = [t[c:] for t, c in zip(tokens, cropped, strict=True)]
        starts = [s - c for s, c in zip(starts, cropped, strict=True)]
        ends = [e - c for e, c in zip(ends, cropped, strict=True)]
        if min(starts) < 1:
            raise CoreScoringError(f"{task.label}: a continuation is longer than max_seq_len={max_seq_len}")
    return ScoringRequest(task.task_type, tokens, starts, ends, gold)


def build_requests(
    task: CoreTask,
    data: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    indices: range | list[int] | None = None,
    max_seq_len: int | None = None,
) -> list[ScoringRequest]:
    """The scoring requests of the items `indices` (default: all) of the pool `data`."""
    indices = range(len(data)) if indices is None else indices
    prompt_lists = [
        render_prompts(data[i], task.task_type, task.continuation_delimiter,
                       fewshot_examples(data, i, task.num_fewshot))
        for i in indices
    ]
    flat = encode_batch(tokenizer, [p for prompts in prompt_lists for p in prompts])
    requests, pos = [], 0
    for i, prompts in zip(indices, prompt_lists, strict=True):
        tokens, pos = flat[pos : pos + len(prompts)], pos + len(prompts)
        gold = data[i].get("gold") if task.task_type != "language_modeling" else None
        requests.append(make_request(task, prompts, tokens, gold, max_seq_len))
    return requests


# ---------------------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class ExampleResult:
    correct: bool
    scores: list[float] = field(default_factory=list)  # MC/schema: mean CE per option; LM: empty
    prediction: int | None = None


def verdict(request: ScoringRequest, mean_losses: list[float], greedy_ok: list[bool]) -> ExampleResult:
    """nanochat's decision from per-option mean CE (MC/schema) or the greedy check of the one LM sequence."""
    if request.task_type == "language_modeling":
        return ExampleResult(correct=bool(greedy_ok[0]))
    pred = mean_losses.index(min(mean_losses))
    return ExampleResult(correct=pred == request.gold, scores=mean_losses, prediction=pred)


def shared_prefix_length(request: ScoringRequest) -> int:
    """Tokens at the front of every sequence of `request` that no span needs a logit from: they can be run once.

    A span [s, e) needs the logits of positions s-1 .. e-2, so the shared prefix stops before the earliest s-1.
    Multiple choice shares its few-shot prompt and question, schema its few-shot prompt; language modelling has
    one sequence, so nothing to share."""
    if len(request.sequences) < 2:
        return 0
    return min(common_length(request.sequences), min(request.starts) - 1)


@torch.no_grad()
def score_requests(
    model: torch.nn.Module, requests: list[ScoringRequest], batch_size: int = 8, pad_token_id: int = 0,
    progress: Callable[[int], object] | None = None,
) -> list[ExampleResult]:
    """Score `requests` with `batch_size` examples per forward pass; results in the order of `requests`;
    `progress(n)` after each batch of n examples.

    For a NanoChat model each example's shared prefix is run once: the batch's prefixes are prefilled together
    (left-padded, so every row's last cached token is real), each prefix's KV cache is copied to the rows of its
    options, and one more forward runs the options' remaining tokens on it. On CORE's few-shot prompts that is
    about half of all tokens. The lm_head then runs only at the (row, position) pairs a span needs. Other models
    run each sequence in full, with logits at the positions some span of the batch needs. Examples are grouped
    by length so that little of each batch is padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # NanoChat's cache works with the engine's KVCache, and its head can run on gathered hidden states.
    ours = getattr(model.config, "model_type", None) == "nanochat_hf" and hasattr(model, "logits_from_hidden")
    score = _score_nanochat_group if ours else _score_group
    prefixes = [shared_prefix_length(r) if ours else 0 for r in requests]
    order = sorted(range(len(requests)), key=lambda i: (prefixes[i], max(len(s) for s in requests[i].sequences)))
    results: list[ExampleResult | None] = [None] * len(requests)
    for b in range(0, len(order), batch_size):
        group = [requests[i] for i in order[b : b + batch_size]]
        means, greedy = score(model, group, [prefixes[i] for i in order[b : b + batch_size]], pad_token_id)
        j = 0
        for i, r in zip(order[b : b + batch_size], group, strict=True):
            n = len(r.sequences)
            results[i] = verdict(r, means[j : j + n], greedy[j : j + n])
            j += n
        if progress is not None:
            progress(len(group))
    return results  # type: ignore[return-value]


@dataclass
class _Rows:
    """The sequences of a group as right-padded tails (what follows each example's first `prefix` tokens) and the
    flat list of (row, position) pairs whose logits the spans need: position q predicts tail token q+1."""

    input_ids: torch.Tensor  # (rows, width)
    owner: torch.Tensor  # (rows,) the example of each row
    tail_start: torch.Tensor  # (rows,) the prefix length of each row's example
    row: torch.Tensor  # (n,) row of each needed logit
    pos: torch.Tensor  # (n,) tail position of each needed logit

    @classmethod
    def of(cls, group: list[ScoringRequest], prefixes: list[int], pad_token_id: int) -> _Rows:
        rows = [(i, k) for i, r in enumerate(group) for k in range(len(r.sequences))]
        tail_start = torch.tensor([prefixes[i] for i, _ in rows])
        tails = [group[i].sequences[k][prefixes[i]:] for i, k in rows]
        width = max(len(t) for t in tails)
        input_ids = torch.tensor([t + [pad_token_id] * (width - len(t)) for t in tails])
        # a span [s, e) needs the logits at s-1 .. e-2
        first = torch.tensor([group[i].starts[k] for i, k in rows]) - tail_start - 1
        count = torch.tensor([group[i].ends[k] - group[i].starts[k] for i, k in rows])
        row = torch.repeat_interleave(torch.arange(len(rows)), count)
        offset = torch.repeat_interleave(count.cumsum(0) - count, count)
        pos = torch.arange(len(row)) - offset + first[row]
        return cls(input_ids, torch.tensor([i for i, _ in rows]), tail_start, row, pos)

    def reduce(self, logits: torch.Tensor) -> tuple[list[float], list[bool]]:
        """Per row: the mean loss over its span (nan for an empty span, as nanochat's mean) and whether the greedy
        prediction hits every span token, from the (n, vocab) logits of the needed pairs. All rows at once:
        per-row tensor ops would cost more than a small model's forward pass."""
        targets = self.input_ids[self.row, self.pos + 1].to(logits.device)
        losses = F.cross_entropy(logits.float(), targets, reduction="none").cpu()
        misses = (logits.argmax(-1) != targets).cpu()
        n_rows = self.input_ids.shape[0]
        count = torch.bincount(self.row, minlength=n_rows)
        means = torch.zeros(n_rows, dtype=losses.dtype).index_add_(0, self.row, losses) / count
        return means.tolist(), (torch.bincount(self.row[misses], minlength=n_rows) == 0).tolist()


def _score_nanochat_group(
    model: torch.nn.Module, group: list[ScoringRequest], prefixes: list[int], pad_token_id: int
) -> tuple[list[float], list[bool]]:
    """Mean span loss and greedy hit of every sequence of `group` (in order), each example's first `prefixes[i]`
    tokens run once."""
    device = next(model.parameters()).device
    rows = _Rows.of(group, prefixes, pad_token_id)
    width = rows.input_ids.shape[1]
    kwargs = {}
    longest = max(prefixes)
    if longest > 0:
        prefix_mask = torch.tensor([[0] * (longest - p) + [1] * p for p in prefixes])
        prefix_ids = torch.tensor([[pad_token_id] * (longest - p) + group[i].sequences[0][:p]
                                   for i, p in enumerate(prefixes)])
        cache = KVCache(model.config.num_hidden_layers, longest + width)
        model.model(input_ids=prefix_ids.to(device), attention_mask=prefix_mask.to(device),
                    position_ids=(prefix_mask.cumsum(1) - 1).clamp(min=0).to(device), cache=cache, use_cache=True)
        kwargs["cache"] = cache.select_rows(rows.owner.to(device))
        # the options' own right padding needs no mask: a causal model's earlier positions never see it
        kwargs["attention_mask"] = torch.cat((prefix_mask[rows.owner], torch.ones_like(rows.input_ids)), 1).to(device)
        kwargs["position_ids"] = (rows.tail_start[:, None] + torch.arange(width)).to(device)
        kwargs["use_cache"] = True
    hidden = model.model(input_ids=rows.input_ids.to(device), **kwargs).last_hidden_state
    return rows.reduce(model.logits_from_hidden(hidden[rows.row.to(device), rows.pos.to(device)]))


def _score_group(
    model: torch.nn.Module, group: list[ScoringRequest], prefixes: list[int], pad_token_id: int
) -> tuple[list[float], list[bool]]:
    """As `_score_nanochat_group` for any causal LM, each sequence run in full (`prefixes` are all 0)."""
    device = next(model.parameters()).device
    rows = _Rows.of(group, prefixes, pad_token_id)
    needed, column = torch.unique(rows.pos, return_inverse=True)
    if "logits_to_keep" in inspect.signature(model.forward).parameters and len(needed):
        logits = model(input_ids=rows.input_ids.to(device), logits_to_keep=needed.to(device)).logits
    else:
        logits, column = model(input_ids=rows.input_ids.to(device)).logits, rows.pos
    return rows.reduce(logits[rows.row.to(device), column.to(device)])


def centered(accuracy: float, random_baseline_percent: float) -> float:
    baseline = 0.01 * random_baseline_percent
    return (accuracy - baseline) / (1.0 - baseline)


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def evaluate_task(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: CoreTask,
    data: list[dict],
    num_eval: int | None = None,
    batch_size: int = 8,
    max_seq_len: int | None = None,
    desc: str | None = None,
) -> list[bool]:
    """Per-example correctness of the first `num_eval` items of the pool. Under torch.distributed each rank takes
    every world_size-th item and the verdicts are summed across ranks, as nanochat does. With `desc`, a progress
    bar of that name (rank 0's items) on stderr."""
    num_eval = len(data) if num_eval is None else num_eval
    rank, world = _distributed()
    mine = list(range(rank, num_eval, world))
    requests = build_requests(task, data, tokenizer, mine, max_seq_len)
    pad = tokenizer.bos_token_id  # nanochat pads with BOS; any id works for a causal model with right padding
    with task_bar(desc, len(mine)) as bar:
        results = score_requests(model, requests, batch_size, pad, bar.update)
    correct = torch.zeros(num_eval, dtype=torch.float32, device=next(model.parameters()).device)
    for i, res in zip(mine, results, strict=True):
        correct[i] = float(res.correct)
    if world > 1:
        torch.distributed.all_reduce(correct)
    return [bool(c) for c in correct.tolist()]


def evaluate_core(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    bundle: str | os.PathLike | None = None,
    max_per_task: int = -1,
    tasks: list[str] | None = None,
    batch_size: int = 8,
    max_seq_len: int | None = None,
    progress: bool = False,
) -> dict:
    """CORE of `model`: ``{"results": {label: accuracy}, "centered_results": {label: centered},
    "core_metric": mean centered, "examples": {label: n}, "seconds": s}``. `tasks` picks a subset by label (CORE
    then averages only those); `progress` shows a bar per task on stderr."""
    bundle_dir = resolve_bundle(bundle)
    all_tasks = load_core_tasks(bundle_dir)
    if tasks is not None:
        unknown = sorted(set(tasks) - {t.label for t in all_tasks})
        if unknown:
            raise ValueError(f"unknown CORE task(s) {unknown}; the bundle has {[t.label for t in all_tasks]}")
        all_tasks = [t for t in all_tasks if t.label in tasks]
    model.eval()
    out = {"results": {}, "centered_results": {}, "examples": {}, "bundle": str(Path(bundle_dir))}
    start = time.perf_counter()
    for task in all_tasks:
        data, num_eval = load_task_data(bundle_dir, task, max_per_task)
        correct = evaluate_task(model, tokenizer, task, data, num_eval, batch_size, max_seq_len,
                                desc=task.label if progress else None)
        accuracy = sum(correct) / len(correct)
        out["results"][task.label] = accuracy
        out["centered_results"][task.label] = centered(accuracy, task.random_baseline)
        out["examples"][task.label] = len(correct)
    out["core_metric"] = sum(out["centered_results"].values()) / len(out["centered_results"])
    out["seconds"] = time.perf_counter() - start
    return out
