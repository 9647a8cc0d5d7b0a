"""CORE (nanochat's 22 DCLM tasks) as lighteval custom tasks: ``--custom-tasks evals/core.py``, tasks ``core|0``
or ``core:<label>|0``. See evals/README.md. The logic lives in nanochat_hf.evaluation.lighteval_core."""

from nanochat_hf.evaluation.lighteval_core import core_tasks_table

TASKS_TABLE = core_tasks_table()
