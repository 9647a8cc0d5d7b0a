"""Chat tasks as Hugging Face `messages` datasets, and the training mixtures built from them.

Hub tasks: SmolTalk, MMLU, GSM8K, ARC-Easy/Challenge, HumanEval (by Hub id through `datasets`, or from a local copy).
Generated: SpellingBee and SimpleSpelling (as in nanochat), arithmetic with calculator calls (the project's own),
and the identity conversations (a JSONL personality; one ships with the package).
"""

from .common import ConversationError, render_mc, tool_call, validate_messages
from .gsm8k import extract_answer, gsm8k_reward
from .mixtures import build_mixture, mixture_parts
from .registry import TASK_NAMES, load_task

__all__ = [
    "TASK_NAMES",
    "ConversationError",
    "build_mixture",
    "extract_answer",
    "gsm8k_reward",
    "load_task",
    "mixture_parts",
    "render_mc",
    "tool_call",
    "validate_messages",
]
