"""ChatCORE as nanochat HEAD defines it (scripts/chat_eval.py, scripts/chat_sft.py; nanochat-spec.md §5.3).

ChatCORE is the mean over five tasks of the centered accuracy (accuracy - baseline) / (1 - baseline): 0 is the
random baseline and 1 a perfect score. The baseline is 0.25 for the 4-way multiple-choice tasks and 0 for the
open-ended ones. ``chatcore_cat`` is the same mean over the categorical (multiple-choice) tasks alone, which HEAD's SFT
logs beside it. As in HEAD, each is computed only when all of its tasks were evaluated. Other tasks, such as
SpellingBee or the CPU tier's offline ones, are reported beside ChatCORE and never averaged into it.

This is the one place that lists the tasks. The chat evaluations, ``nanochat-hf eval``, the report card, the model
card and the lighteval results all read it from here. The module imports only the standard library, so any of them
can import it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# task -> random baseline, in HEAD's order (chat_eval.py's all_tasks)
CHATCORE_TASKS: dict[str, float] = {
    "ARC-Easy": 0.25,  # 1 of 4 letters
    "ARC-Challenge": 0.25,
    "MMLU": 0.25,
    "GSM8K": 0.0,  # open-ended
    "HumanEval": 0.0,
}
# HEAD's chat_sft.py: categorical_tasks, the ones scored by the letters' logits instead of sampling
CATEGORICAL_TASKS: tuple[str, ...] = ("ARC-Easy", "ARC-Challenge", "MMLU")
# Evaluated on the Hub tiers and reported beside ChatCORE, never inside it
BESIDE_CHATCORE: tuple[str, ...] = ("SpellingBee",)
# The names the results JSON, the report card and the model card use
CHATCORE, CHATCORE_CAT = "ChatCORE", "ChatCORE_cat"
# Each task's key in the project's task registry and in the lighteval task names (`chat:<key>|0`)
TASK_KEYS: dict[str, str] = {
    "ARC-Easy": "arc_easy",
    "ARC-Challenge": "arc_challenge",
    "MMLU": "mmlu",
    "GSM8K": "gsm8k",
    "HumanEval": "humaneval",
    "SpellingBee": "spellingbee",
}


def _centered_mean(accuracies: Mapping[str, float], tasks: tuple[str, ...]) -> float | None:
    if not all(task in accuracies for task in tasks):
        return None
    centered = []
    for task in tasks:
        accuracy = accuracies[task]
        if not (isinstance(accuracy, int | float) and math.isfinite(accuracy) and 0.0 <= accuracy <= 1.0):
            raise ValueError(f"{task} accuracy {accuracy!r} is not in [0, 1]: pass the fraction of items passed")
        baseline = CHATCORE_TASKS[task]
        centered.append((accuracy - baseline) / (1.0 - baseline))
    return sum(centered) / len(centered)


def chatcore(accuracies: Mapping[str, float]) -> float | None:
    """ChatCORE from `accuracies` (task name -> accuracy): the mean centered accuracy over CHATCORE_TASKS. None when
    one of them is missing. Any other task in `accuracies` is ignored."""
    return _centered_mean(accuracies, tuple(CHATCORE_TASKS))


def chatcore_cat(accuracies: Mapping[str, float]) -> float | None:
    """HEAD's chatcore_cat: the mean centered accuracy over the categorical tasks alone. None when one is missing."""
    return _centered_mean(accuracies, CATEGORICAL_TASKS)


def lighteval_chatcore(results: Mapping[str, Mapping[str, float]]) -> dict[str, float | None]:
    """ChatCORE and ChatCORE_cat from lighteval's ``results`` section for the ``chat:<task>|0`` tasks (keys with or
    without a suite prefix, e.g. ``community|chat:mmlu|0``). lighteval itself knows nothing of ChatCORE."""
    accuracies = {}
    for name, key in TASK_KEYS.items():
        for task, metrics in results.items():
            if f"chat:{key}" in task.split("|") and isinstance(metrics, Mapping) and "acc" in metrics:
                accuracies[name] = metrics["acc"]
    return {CHATCORE: chatcore(accuracies), CHATCORE_CAT: chatcore_cat(accuracies)}

