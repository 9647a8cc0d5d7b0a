"""Evaluation: CORE from nanochat's eval bundle (as our batched scorer and as lighteval custom tasks), bits per
byte, and the lighteval command line with its offline guards. Importing this package imports neither lighteval
nor the eval bundle."""

from .bundle import CoreTask, EvalBundleError, load_core_tasks, load_task_data, resolve_bundle
from .core import CoreScoringError, build_requests, evaluate_core, evaluate_task, score_requests

__all__ = [
    "CoreScoringError",
    "CoreTask",
    "EvalBundleError",
    "build_requests",
    "evaluate_core",
    "evaluate_task",
    "load_core_tasks",
    "load_task_data",
    "resolve_bundle",
    "score_requests",
]
