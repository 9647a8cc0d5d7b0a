"""nanochat's chat evaluations (nanochat-spec.md §5.3) on a `NanoChatForCausalLM`, and the CPU tier's offline ones.

* Categorical (ARC-Easy, ARC-Challenge, MMLU): the conversation up to the question, rendered for completion (it ends
  with `<|assistant_start|>`), one forward pass for a batch of prompts right-padded with `<|bos|>`; at the last prompt
  position, the logits restricted to the token ids of the offered letters; their argmax is the answer. No sampling.
* Generative (GSM8K, HumanEval, SpellingBee): the Engine (KV cache, the calculator forced into python blocks) samples
  `num_samples` replies (greedy by default, 512 tokens); an item passes if any reply passes. GSM8K and SpellingBee
  compare the "#### N" answers; HumanEval runs prompt imports + the reply's first code block (nanochat's rule, in
  tasks/humaneval.py) + the tests in the sandbox.
* ChatCORE (evaluation/chatcore.py): the mean centered accuracy over ARC-Easy, ARC-Challenge, MMLU, GSM8K and
  HumanEval. SpellingBee is evaluated on the Hub tiers too and reported beside it, never inside it.

The CPU tier (`--tier cpu`) cannot download the Hub tasks; it evaluates the project's own generators on their test
split (seeds offset by 10,000,000 from training's): Arithmetic (calculator calls, "#### N"), SimpleSpelling (exact
reply) and SpellingBee (words from the Python docs, as the CPU mixtures use). None of them is a ChatCORE task, so
that tier reports no ChatCORE. Every generative task also reports the
chat-format metrics the CPU speedrun is judged on: `ends_turn_rate`, the fraction of replies that end with
`<|assistant_end|>` within the token budget, and (Arithmetic, GSM8K) `calculator_rate`, the fraction of replies that
call the python tool.

The runners: `HUB_CHAT_EVALS` (the Hub tiers) and `CPU_TIER_EVALS` (the CPU tier), which the `eval` stage
(`nanochat_hf.evaluation.evaluate`) and the SFT's in-training ChatCORE read.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import UsageError
from ..inference.engine import Engine
from ..inference.tools import run_python
from ..tasks import gsm8k_reward, load_task
from ..tasks.humaneval import humaneval_program
from ..tasks.mixtures import _REPOS as HUB_REPOS
from ..tasks.mixtures import NANOCHAT_SHUFFLE_SEED
from ..tasks.spelling import WORD_LIST_URL, embedded_words, simple_spelling, spelling_bee
from .chatcore import BESIDE_CHATCORE, CATEGORICAL_TASKS, CHATCORE_TASKS, TASK_KEYS, chatcore, chatcore_cat
from .progress import task_bar

# nanochat's eval sets: split per Hub task; the generated tasks are evaluated on 256 items of their test split.
HUB_SPLITS = {"arc_easy": "test", "arc_challenge": "test", "mmlu": "test", "gsm8k": "test", "humaneval": "test"}
GENERATED_EVAL_SIZE = 256
MAX_TOKENS = {"hub": 512, "cpu": 256}  # nanochat's -m 512; the CPU tier's replies are short (< 200 tokens)
HUMANEVAL_TIMEOUT_S, HUMANEVAL_MEMORY_MB = 5.0, 256
DATA_DIR_ENV = "NANOCHAT_CHAT_DATA_DIR"  # lighteval's tasks (evals/chat.py) read local copies from here


class ChatEvalError(ValueError):
    """An eval item cannot be scored as nanochat scores it; the message names the task, item and fix."""


# ---------------------------------------------------------------------------------------------------------------
# Prompts


def prompt_messages(messages: Sequence[dict]) -> list[dict]:
    """The conversation up to and including its last user message: the reference reply (text, tool calls and tool
    outputs) is what the model must produce."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        raise ChatEvalError("the conversation has no user message to answer")
    return [dict(m) for m in messages[: last_user + 1]]


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict]) -> list[int]:
    """nanochat's render_for_completion: `<|bos|>`, the turns, then `<|assistant_start|>`."""
    return list(tokenizer.apply_chat_template(prompt_messages(messages), add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def letter_token_ids(tokenizer: PreTrainedTokenizerBase, letters: Sequence[str]) -> list[int]:
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter, add_special_tokens=False)
        if len(encoded) != 1:
            raise ChatEvalError(f"answer letter {letter!r} is {len(encoded)} tokens; categorical scoring needs each "
                                "letter to be one token (nanochat's tokenizer encodes A-Z and 0-9 as one each)")
        ids.append(encoded[0])
    return ids


# ---------------------------------------------------------------------------------------------------------------
# Categorical scoring


@torch.inference_mode()
def letter_logprobs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict],
                    batch_size: int = 8, progress: Callable[[int], object] | None = None) -> list[list[float]]:
    """For each multiple-choice row (`messages`, `letters`): the log-probabilities of its letters' tokens right after
    `<|assistant_start|>` (one forward pass per batch of prompts; `progress(n)` after each batch of n rows)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bos = tokenizer.convert_tokens_to_ids("<|bos|>")
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        prompts = [render_prompt(tokenizer, row["messages"]) for row in batch]
        width = max(len(p) for p in prompts)
        # Right padding with <|bos|> as nanochat: causal attention keeps it out of every real position's logits.
        ids = torch.full((len(prompts), width), bos, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, : len(prompt)] = torch.tensor(prompt)
        logits = model(input_ids=ids.to(device)).logits  # (B, T, V)
        last = torch.tensor([len(p) - 1 for p in prompts], device=device)
        answer = torch.log_softmax(logits[torch.arange(len(prompts), device=device), last].float(), dim=-1)  # (B, V)
        for row, row_logprobs in zip(batch, answer, strict=True):
            out.append(row_logprobs[letter_token_ids(tokenizer, row["letters"])].tolist())
        if progress is not None:
            progress(len(batch))
    return out


def letter_predictions(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict],
                       batch_size: int = 8, progress: Callable[[int], object] | None = None) -> list[str]:
    """nanochat's categorical answer per row: the letter with the highest logit among the row's letters (the
    log-softmax shifts all of them alike, so its argmax is the same)."""
    scores = letter_logprobs(model, tokenizer, rows, batch_size, progress)
    return [row["letters"][max(range(len(s)), key=s.__getitem__)] for row, s in zip(rows, scores, strict=True)]


def evaluate_multiple_choice(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dataset: datasets.Dataset,
                             *, batch_size: int = 8, details: bool = False, desc: str | None = None,
                             **_unused) -> dict:
    """Accuracy of the categorical letter answers over `dataset` (rows with `messages`, `letters`, `answer`); with
    `desc`, a progress bar of that name on stderr."""
    rows = list(dataset)
    if not rows:
        raise ChatEvalError("no items to evaluate (the dataset is empty, or --max-per-task is 0)")
    with task_bar(desc, len(rows)) as bar:
        predicted = letter_predictions(model, tokenizer, rows, batch_size, bar.update)
    correct = [p == row["answer"] for p, row in zip(predicted, rows, strict=True)]
    result = {"accuracy": sum(correct) / len(rows), "examples": len(rows)}
    if details:
        result["items"] = [{"prediction": p, "answer": r["answer"], "correct": c}
                           for p, r, c in zip(predicted, rows, correct, strict=True)]
    return result


# ---------------------------------------------------------------------------------------------------------------
# Generation


@dataclass
class Reply:
    """One generated reply: its tokens (prompt and terminal token excluded), its text (special tokens kept, so tool
    blocks read as `<|python_start|>...`), and whether it ended its turn within the budget."""

    tokens: list[int]
    text: str
    ended: bool
    called_tool: bool


def generate_replies(engine: Engine, prompt_ids: list[int], *, num_samples: int = 1, max_tokens: int = 512,
                     temperature: float = 0.0, top_k: int | None = 50, seed: int = 42) -> list[Reply]:
    """`num_samples` replies to one prompt through the Engine (the calculator runs inside python blocks). A reply
    also ends where the model's context does; a prompt that fills the context is refused by the engine."""
    room = engine.context_length - len(prompt_ids)
    if 1 <= room < max_tokens:
        max_tokens = room
    tokens: list[list[int]] = [[] for _ in range(num_samples)]
    stopped: list[int | None] = [None] * num_samples
    for column, _ in engine.generate(prompt_ids, num_samples, max_tokens, temperature, top_k, seed):
        for i, token in enumerate(column):
            if stopped[i] is not None:
                continue
            if token in engine.stop_ids:
                stopped[i] = token
            else:
                tokens[i].append(token)
    python_start = engine.ids["python_start"]
    return [
        Reply(ids, engine.tokenizer.decode(ids, skip_special_tokens=False), stop == engine.ids["assistant_end"],
              python_start in ids)
        for ids, stop in zip(tokens, stopped, strict=True)
    ]


def evaluate_generative(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dataset: datasets.Dataset,
                        score: Callable[[dict, Reply], bool], *, num_samples: int = 1, max_tokens: int = 512,
                        temperature: float = 0.0, top_k: int | None = 50, tool_rate: bool = False,
                        details: bool = False, desc: str | None = None, **_unused) -> dict:
    """pass@`num_samples` accuracy of `score(row, reply)` over `dataset`, with `ends_turn_rate` (and, when
    `tool_rate`, `calculator_rate`) over all replies; with `desc`, a progress bar of that name on stderr."""
    rows = list(dataset)
    if not rows:
        raise ChatEvalError("no items to evaluate (the dataset is empty, or --max-per-task is 0)")
    engine = Engine(model, tokenizer)
    passed, ended, called, items = 0, 0, 0, []
    with task_bar(desc, len(rows)) as bar:
        for row in rows:
            replies = generate_replies(engine, render_prompt(tokenizer, row["messages"]), num_samples=num_samples,
                                       max_tokens=max_tokens, temperature=temperature, top_k=top_k)
            outcomes = [bool(score(row, reply)) for reply in replies]
            passed += any(outcomes)
            ended += sum(r.ended for r in replies)
            called += sum(r.called_tool for r in replies)
            if details:
                items.append({"replies": [r.text for r in replies], "tokens": [r.tokens for r in replies],
                              "ended": [r.ended for r in replies], "passed": outcomes})
            bar.update(1)
    total = len(rows) * num_samples
    result = {"accuracy": passed / len(rows), "examples": len(rows), "replies": total, "ends_turn_rate": ended / total}
    if tool_rate:
        result["calculator_rate"] = called / total
    if details:
        result["items"] = items
    return result


# ---------------------------------------------------------------------------------------------------------------
# Scoring of one reply


def score_answer(row: dict, reply: Reply) -> bool:
    """GSM8K / SpellingBee / Arithmetic: the reply's "#### N" equals the row's `answer`."""
    return gsm8k_reward(reply.text, row["answer"]) == 1.0


def score_exact(row: dict, reply: Reply) -> bool:
    """SimpleSpelling: the reply is the reference reply ("word:w,o,r,d")."""
    return reply.text.strip() == row["messages"][-1]["content"].strip()


def score_humaneval(row: dict, reply: Reply | str) -> bool:
    """The reply's program passes the item's tests in the sandbox (nanochat: 5 s, 256 MB)."""
    text = reply.text if isinstance(reply, Reply) else reply
    return run_python(humaneval_program(row, text), timeout=HUMANEVAL_TIMEOUT_S, memory_mb=HUMANEVAL_MEMORY_MB).success


# How each generative task scores a reply (also used by the lighteval tasks in lighteval_chat.py).
GENERATIVE_SCORERS: dict[str, Callable[[dict, Reply], bool]] = {
    "gsm8k": score_answer,
    "humaneval": score_humaneval,
    "spellingbee": score_answer,
    "arithmetic": score_answer,
    "simplespelling": score_exact,
}


# ---------------------------------------------------------------------------------------------------------------
# Eval sets


def _first(dataset: datasets.Dataset, max_per_task: int) -> datasets.Dataset:
    return dataset if max_per_task < 0 else dataset.select(range(min(max_per_task, len(dataset))))


def _eval_size(max_per_task: int) -> int:
    return GENERATED_EVAL_SIZE if max_per_task < 0 else min(GENERATED_EVAL_SIZE, max_per_task)


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def _hub_copy_missing(name: str, data_dir: str | os.PathLike | None) -> bool:
    """Whether the Hub task `name` cannot be read without the network: no `<data_dir>/<owner>/<name>` when
    `data_dir` is given, else (offline only) no snapshot in the Hub cache. Online, the download decides."""
    repo = HUB_REPOS[name]
    if data_dir is not None:
        return not (Path(data_dir) / repo).exists()
    if not _offline():
        return False
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo, repo_type="dataset")  # offline: a lookup in the local cache only
    except Exception:  # LocalEntryNotFoundError and friends: nothing usable in the cache
        return True
    return False


def _words_missing(data_dir: str | os.PathLike | None) -> bool:
    if data_dir is not None and (Path(data_dir) / "words_alpha.txt").is_file():
        return False
    from huggingface_hub import constants

    return _offline() and not (Path(constants.HF_HOME) / "nanochat_hf" / "words_alpha.txt").is_file()


def missing_data_error(missing: Sequence[str], data_dir: str | os.PathLike | None, why: str = "") -> UsageError:
    """One line: which eval data is missing (Hub repo ids, `words_alpha.txt`) and how to point at a local copy."""
    where = f" in --data-dir {data_dir}" if data_dir is not None else " offline (HF_HUB_OFFLINE=1)" if _offline() else ""
    repos, how = [m for m in missing if m != "words_alpha.txt"], []
    if len(repos) == 1:
        how.append(f"`hf download {repos[0]} --repo-type dataset --local-dir DIR/{repos[0]}`")
    elif repos:
        how.append("`hf download <repo> --repo-type dataset --local-dir DIR/<repo>` for each repo")
    if "words_alpha.txt" in missing:
        how.append(f"{WORD_LIST_URL} saved as DIR/words_alpha.txt")
    return UsageError(f"chat eval data not found{where}{why}: {', '.join(missing)}; copy it while online "
                      f"({' and '.join(how)}), then pass --data-dir DIR (lighteval: ${DATA_DIR_ENV}=DIR)")


def check_hub_data(data_dir: str | os.PathLike | None = None) -> None:
    """Refuse, before a model loads, to run the Hub tier's chat evals when some of their data can only come from
    the network and it may not: the error lists every missing dataset at once (see `missing_data_error`)."""
    missing = list(dict.fromkeys(HUB_REPOS[n] for n in HUB_SPLITS if _hub_copy_missing(n, data_dir)))
    if _words_missing(data_dir):
        missing.append("words_alpha.txt")
    if missing:
        raise missing_data_error(missing, data_dir)


def hub_eval_set(name: str, max_per_task: int = -1, data_dir: str | os.PathLike | None = None) -> datasets.Dataset:
    """A Hub task's eval split, shuffled with nanochat's seed 42, its first `max_per_task` items (-1 = all).
    `data_dir` holds local copies (`<data_dir>/<owner>/<name>`, as `hf download --local-dir` lays them out)."""
    if _hub_copy_missing(name, data_dir):
        raise missing_data_error([HUB_REPOS[name]], data_dir)
    path = Path(data_dir) / HUB_REPOS[name] if data_dir is not None else None
    try:
        dataset = load_task(name, HUB_SPLITS[name], path)
    except (ConnectionError, TimeoutError) as err:  # datasets: "Couldn't reach '<repo>' on the Hub (...)"
        raise missing_data_error([HUB_REPOS[name]], data_dir, f" (the Hub is unreachable: {err})") from err
    return _first(dataset.shuffle(seed=NANOCHAT_SHUFFLE_SEED), max_per_task)


def spellingbee_eval_set(max_per_task: int = -1, data_dir: str | os.PathLike | None = None) -> datasets.Dataset:
    """nanochat's SpellingBee eval: 256 items of the test split over words_alpha.txt (`<data_dir>/words_alpha.txt`
    when present, else the cached download)."""
    if _words_missing(data_dir):
        raise missing_data_error(["words_alpha.txt"], data_dir)
    words = Path(data_dir) / "words_alpha.txt" if data_dir is not None else None
    return load_task("spellingbee", "test", words if words is not None and words.is_file() else None,
                     size=_eval_size(max_per_task))


@functools.lru_cache(maxsize=1)
def _cpu_words() -> tuple[str, ...]:
    return tuple(embedded_words())


def cpu_eval_set(name: str, max_per_task: int = -1) -> datasets.Dataset:
    """The CPU tier's held-out items: the generators' test split (never the seeds training draws from)."""
    size = _eval_size(max_per_task)
    if name == "arithmetic":
        return load_task("arithmetic", "test", size=size)
    words = list(_cpu_words())
    return (spelling_bee if name == "spellingbee" else simple_spelling)(words, "test", size)


# ---------------------------------------------------------------------------------------------------------------
# Runners: fn(model, tokenizer, max_per_task=..., batch_size=..., data_dir=..., max_tokens=..., details=...)


def _mc_runner(name: str) -> Callable[..., dict]:
    def run(model, tokenizer, max_per_task: int = -1, batch_size: int = 8, data_dir=None, **kwargs) -> dict:
        return evaluate_multiple_choice(model, tokenizer, hub_eval_set(name, max_per_task, data_dir),
                                        batch_size=batch_size, **kwargs)

    return run


def _generative_runner(load: Callable[[int, str | None], datasets.Dataset], score: Callable[[dict, Reply], bool],
                       tier: str, tool_rate: bool = False) -> Callable[..., dict]:
    def run(model, tokenizer, max_per_task: int = -1, batch_size: int = 8, data_dir=None, max_tokens=None,
            **kwargs) -> dict:
        return evaluate_generative(model, tokenizer, load(max_per_task, data_dir), score, tool_rate=tool_rate,
                                   max_tokens=max_tokens or MAX_TOKENS[tier], **kwargs)

    return run


# task registry key -> runner
_HUB_RUNNERS: dict[str, Callable[..., dict]] = {
    "arc_easy": _mc_runner("arc_easy"),
    "arc_challenge": _mc_runner("arc_challenge"),
    "mmlu": _mc_runner("mmlu"),
    "gsm8k": _generative_runner(lambda n, d: hub_eval_set("gsm8k", n, d), score_answer, "hub", tool_rate=True),
    "humaneval": _generative_runner(lambda n, d: hub_eval_set("humaneval", n, d), score_humaneval, "hub"),
    "spellingbee": _generative_runner(spellingbee_eval_set, score_answer, "hub"),
}
# name -> runner: the ChatCORE tasks, then those reported beside ChatCORE (chatcore.py lists both)
HUB_CHAT_EVALS: dict[str, Callable[..., dict]] = {
    name: _HUB_RUNNERS[TASK_KEYS[name]] for name in (*CHATCORE_TASKS, *BESIDE_CHATCORE)
}
CPU_TIER_EVALS: dict[str, Callable[..., dict]] = {
    "Arithmetic": _generative_runner(lambda n, d: cpu_eval_set("arithmetic", n), score_answer, "cpu", tool_rate=True),
    "SimpleSpelling": _generative_runner(lambda n, d: cpu_eval_set("simplespelling", n), score_exact, "cpu"),
    "SpellingBee": _generative_runner(lambda n, d: cpu_eval_set("spellingbee", n), score_answer, "cpu"),
}


def measure_chatcore(model, tokenizer, *, max_categorical: int = -1, max_generative: int = 24, batch_size: int = 8,
                     data_dir: str | os.PathLike | None = None) -> dict[str, float]:
    """HEAD chat_sft's in-training ChatCORE (--chatcore-max-cat -1, --chatcore-max-sample 24): every task of
    CHATCORE_TASKS on its first `max_categorical` (multiple choice) or `max_generative` (sampled) problems, -1 for
    all. Returns each accuracy as ``chatcore/<task>`` beside ``chatcore`` and ``chatcore_cat``."""
    accuracies = {}
    for name in CHATCORE_TASKS:
        limit = max_categorical if name in CATEGORICAL_TASKS else max_generative
        accuracies[name] = HUB_CHAT_EVALS[name](model, tokenizer, max_per_task=limit, batch_size=batch_size,
                                                data_dir=data_dir)["accuracy"]
    return {"chatcore": chatcore(accuracies), "chatcore_cat": chatcore_cat(accuracies),
            **{f"chatcore/{name}": accuracy for name, accuracy in accuracies.items()}}


def format_metrics(task_results: dict[str, dict]) -> dict:
    """The chat-format metrics over every reply of the generative tasks: `ends_turn_rate` and `calculator_rate`
    (over the tasks that measure it: the arithmetic ones); None where no task measured it."""

    def pooled(key: str) -> float | None:
        measured = [r for r in task_results.values() if key in r]
        total = sum(r["replies"] for r in measured)
        return sum(r[key] * r["replies"] for r in measured) / total if total else None

    return {"ends_turn_rate": pooled("ends_turn_rate"), "calculator_rate": pooled("calculator_rate")}
