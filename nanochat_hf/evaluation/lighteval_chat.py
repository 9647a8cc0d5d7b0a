"""The chat evaluations as lighteval 0.13 custom tasks, and nanochat's Engine as a lighteval model
(`evals/chat.py` exposes both: ``TASKS_TABLE`` for ``--custom-tasks`` and the model class for ``lighteval custom``).

Tasks (request each with ``|0``): ``chat:arc_easy``, ``chat:arc_challenge``, ``chat:mmlu`` (categorical),
``chat:gsm8k``, ``chat:humaneval``, ``chat:spellingbee`` (generative) and, offline, the CPU tier's
``chat_cpu:arithmetic``, ``chat_cpu:simplespelling``, ``chat_cpu:spellingbee``. The Hub tasks read their Hub dataset
through lighteval (``$NANOCHAT_CHAT_DATA_DIR/<owner>/<name>`` when that folder exists: a local copy laid out like
the Hub repo); the generated ones read a file of item indices and build item i with the project's generators.

Each Doc carries the conversation to complete in ``doc.specific["messages"]``: the model renders it with the
checkpoint's chat template itself, so nothing depends on lighteval's prompt manager. The model
(:class:`NanoChatEngineModel`) answers loglikelihood requests with the log-probabilities of the letter tokens right
after ``<|assistant_start|>`` (nanochat's categorical scoring) and generation requests with the Engine, greedy, the
calculator forced into python blocks; replies keep their special tokens and end with ``<|assistant_end|>`` when the
model ended its turn, which the ``ends_turn`` and ``calculator`` metrics read. lighteval's transformers backend
(``lighteval accelerate``) has no tool use and decodes without special tokens, so run these tasks with
``lighteval custom``.

lighteval reports each task's ``acc`` and knows nothing of ChatCORE: ``chatcore.lighteval_chatcore(results)`` gives
ChatCORE and ChatCORE_cat from its ``results`` section (``chat:spellingbee`` is not part of either).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from lighteval.metrics.metrics_sample import SampleLevelComputation
from lighteval.metrics.utils.metric_utils import MetricGrouping
from lighteval.models.abstract_model import LightevalModel
from lighteval.models.custom.custom_model import CustomModelConfig
from lighteval.models.model_output import ModelResponse
from lighteval.tasks.lighteval_task import LightevalTaskConfig
from lighteval.tasks.requests import Doc, SamplingMethod

from ..inference.engine import Engine
from ..tasks import extract_answer, render_mc
from ..tasks.mixtures import _REPOS as HUB_REPOS
from .bundle import cache_dir
from .chat import (
    GENERATED_EVAL_SIZE,
    GENERATIVE_SCORERS,
    HUB_SPLITS,
    MAX_TOKENS,
    Reply,
    cpu_eval_set,
    generate_replies,
    letter_logprobs,
    prompt_messages,
    render_prompt,
    spellingbee_eval_set,
)
from .chatcore import CATEGORICAL_TASKS, CHATCORE_TASKS, TASK_KEYS

DATA_DIR_ENV = "NANOCHAT_CHAT_DATA_DIR"
MAX_TOKENS_ENV = "NANOCHAT_CHAT_MAX_TOKENS"  # overrides each reply's token budget (default 512, CPU tasks 256)
BATCH_SIZE_ENV = "NANOCHAT_CHAT_BATCH_SIZE"  # prompts per forward pass of the categorical tasks (default 8)
ASSISTANT_END, PYTHON_START = "<|assistant_end|>", "<|python_start|>"
# The Hub tasks are ChatCORE's (evaluation/chatcore.py), under their registry keys: key -> (dataset config, split)
_HUB_CONFIGS = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "mmlu": "all", "gsm8k": "main",
                "humaneval": "openai_humaneval"}
HUB_TASKS = {TASK_KEYS[name]: (_HUB_CONFIGS[TASK_KEYS[name]], HUB_SPLITS[TASK_KEYS[name]]) for name in CHATCORE_TASKS}
MULTIPLE_CHOICE = tuple(TASK_KEYS[name] for name in CATEGORICAL_TASKS)


# ---------------------------------------------------------------------------------------------------------------
# Rows -> Docs


def _hub_row(name: str, line: dict) -> dict:
    """A Hub dataset row as the eval row `nanochat_hf.tasks` builds for it (prompt messages + scoring fields)."""
    if name in ("arc_easy", "arc_challenge"):
        letters, texts = list(line["choices"]["label"]), list(line["choices"]["text"])
        return {"messages": [{"role": "user", "content": render_mc(line["question"], letters, texts)}],
                "letters": letters, "answer": line["answerKey"]}
    if name == "mmlu":
        letters = ["A", "B", "C", "D"]
        return {"messages": [{"role": "user", "content": render_mc(line["question"], letters, line["choices"])}],
                "letters": letters, "answer": letters[int(line["answer"])]}
    if name == "gsm8k":
        return {"messages": [{"role": "user", "content": line["question"]}], "answer": extract_answer(line["answer"])}
    return {"messages": [{"role": "user", "content": line["prompt"]}],
            **{k: line[k] for k in ("prompt", "test", "entry_point")}}


@functools.lru_cache(maxsize=8)
def _generated_rows(name: str) -> list[dict]:
    if name == "spellingbee":
        data_dir = os.environ.get(DATA_DIR_ENV)
        rows = spellingbee_eval_set(-1, data_dir)
    else:
        rows = cpu_eval_set(name.removeprefix("cpu_"))
    return [{"messages": r["messages"], **({"answer": r["answer"]} if "answer" in r else {})} for r in rows]


def _doc(name: str, task_name: str, row: dict) -> Doc:
    query = prompt_messages(row["messages"])[-1]["content"]
    if name in MULTIPLE_CHOICE:
        return Doc(task_name=task_name, query=query, choices=row["letters"],
                   gold_index=row["letters"].index(row["answer"]), specific={"kind": name, "row": row})
    reference = row.get("answer") or row["messages"][-1]["content"]
    return Doc(task_name=task_name, query=query, choices=[str(reference)], gold_index=0,
               specific={"kind": name, "row": row})


def hub_prompt(line: dict, task_name: str, *, name: str) -> Doc:
    return _doc(name, task_name, _hub_row(name, line))


def generated_prompt(line: dict, task_name: str, *, name: str) -> Doc:
    return _doc(name.removeprefix("cpu_"), task_name, _generated_rows(name)[int(line["index"])])


# ---------------------------------------------------------------------------------------------------------------
# Metrics


class ChatScore(SampleLevelComputation):
    """acc per item; for generative tasks also whether the reply ended its turn and whether it called the tool."""

    def __init__(self, kind: str):
        self.kind = kind

    def compute(self, doc: Doc, model_response: ModelResponse, **kwargs) -> dict[str, float]:
        if self.kind in MULTIPLE_CHOICE:
            return {"acc": float(int(np.argmax(model_response.logprobs)) == doc.gold_index)}
        text = model_response.text[0]
        ended = text.endswith(ASSISTANT_END)
        reply = Reply([], text.removesuffix(ASSISTANT_END), ended, PYTHON_START in text)
        correct = GENERATIVE_SCORERS[self.kind](doc.specific["row"], reply)
        return {"acc": float(correct), "ends_turn": float(ended), "calculator": float(reply.called_tool)}


def chat_metric(kind: str) -> MetricGrouping:
    names = ["acc"] if kind in MULTIPLE_CHOICE else ["acc", "ends_turn", "calculator"]
    return MetricGrouping(
        metric_name=names,
        higher_is_better=dict.fromkeys(names, True),
        category=SamplingMethod.LOGPROBS if kind in MULTIPLE_CHOICE else SamplingMethod.GENERATIVE,
        sample_level_fn=ChatScore(kind),
        corpus_level_fn=dict.fromkeys(names, np.mean),
    )


# ---------------------------------------------------------------------------------------------------------------
# Task table


def _index_rows(name: str, count: int) -> Path:
    """A dataset of item indices (`datasets.load_dataset(folder)` reads it), written once, atomically."""
    root = cache_dir() / "lighteval_chat"
    folder = root / f"{name}-n{count}"
    if (folder / "items.jsonl").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    (staging / "items.jsonl").write_text("".join(json.dumps({"index": i}) + "\n" for i in range(count)))
    try:
        os.replace(staging, folder)
    except OSError:
        if not (folder / "items.jsonl").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _hub_source(name: str) -> str:
    data_dir = os.environ.get(DATA_DIR_ENV)
    local = Path(data_dir) / HUB_REPOS[name] if data_dir else None
    return str(local) if local is not None and local.is_dir() else HUB_REPOS[name]


def _max_tokens(tier: str) -> int:
    raw = os.environ.get(MAX_TOKENS_ENV)
    try:
        value = int(raw) if raw else MAX_TOKENS[tier]
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"${MAX_TOKENS_ENV}={raw!r}: give a positive number of tokens per reply")
    return value


def chat_tasks_table() -> list[LightevalTaskConfig]:
    """The chat tasks (``chat:<name>``) and the CPU tier's (``chat_cpu:<name>``); nothing is loaded until a task
    runs."""
    table = []
    for name, (subset, split) in HUB_TASKS.items():
        table.append(LightevalTaskConfig(
            name=f"chat:{name}", prompt_function=functools.partial(hub_prompt, name=name), hf_repo=_hub_source(name),
            hf_subset=subset, hf_avail_splits=[split], evaluation_splits=[split], few_shots_split=None,
            metrics=[chat_metric(name)], generation_size=None if name in MULTIPLE_CHOICE else _max_tokens("hub"),
            version=0,
        ))
    generated = [("chat:spellingbee", "spellingbee", "hub"),
                 *((f"chat_cpu:{n}", f"cpu_{n}", "cpu") for n in ("arithmetic", "simplespelling", "spellingbee"))]
    for task_name, name, tier in generated:
        table.append(LightevalTaskConfig(
            name=task_name, prompt_function=functools.partial(generated_prompt, name=name),
            hf_repo=str(_index_rows(name, GENERATED_EVAL_SIZE)), hf_subset="default", hf_avail_splits=["train"],
            evaluation_splits=["train"], few_shots_split=None, metrics=[chat_metric(name.removeprefix("cpu_"))],
            generation_size=_max_tokens(tier), version=0,
        ))
    return table


# ---------------------------------------------------------------------------------------------------------------
# The model


class _NoSampleCache:
    """lighteval's pipeline hands every model its task registry for the sample cache; this model keeps no cache
    (a cache keyed by the model's path would serve a re-trained checkpoint stale results)."""

    def _init_registry(self, registry) -> None:
        pass


class NanoChatEngineModel(LightevalModel):
    """A nanochat-hf checkpoint (``lighteval custom <folder or repo id> evals/chat.py ...``) behind the Engine."""

    def __init__(self, config: CustomModelConfig):
        self.config = config
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.engine = Engine.from_pretrained(config.model_name, dtype=torch.bfloat16 if device == "cuda" else None,
                                             device=device)
        self.batch_size = int(os.environ.get(BATCH_SIZE_ENV, "8"))
        self._cache = _NoSampleCache()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def add_special_tokens(self) -> bool:
        return False

    @property
    def max_length(self) -> int:
        return self.engine.model.config.max_position_embeddings

    def greedy_until(self, docs: list[Doc]) -> list[ModelResponse]:
        responses = []
        for doc in docs:
            prompt = render_prompt(self.tokenizer, doc.specific["row"]["messages"])
            (reply,) = generate_replies(self.engine, prompt, max_tokens=doc.generation_size or MAX_TOKENS["hub"],
                                        temperature=0.0)
            text = reply.text + (ASSISTANT_END if reply.ended else "")
            responses.append(ModelResponse(input=doc.query, text=[text], input_tokens=prompt,
                                           output_tokens=[reply.tokens]))
        return responses

    def loglikelihood(self, docs: list[Doc]) -> list[ModelResponse]:
        scores = letter_logprobs(self.engine.model, self.tokenizer, [d.specific["row"] for d in docs],
                                 self.batch_size)
        responses = []
        for doc, logprobs in zip(docs, scores, strict=True):
            best = int(np.argmax(logprobs))
            responses.append(ModelResponse(input=doc.query, logprobs=logprobs,
                                           argmax_logits_eq_gold=[i == best for i in range(len(logprobs))]))
        return responses

    def loglikelihood_rolling(self, docs: list[Doc]) -> list[ModelResponse]:
        raise NotImplementedError("the chat tasks need no rolling loglikelihood; run CORE/bpb with evals/core.py")
