"""nanochat's chat evaluations as lighteval custom tasks, and the model that runs them (nanochat's Engine, with the
calculator): ``lighteval custom <checkpoint> evals/chat.py "chat:gsm8k|0" --custom-tasks evals/chat.py``. See
evals/README.md. The logic lives in nanochat_hf.evaluation.lighteval_chat."""

from nanochat_hf.evaluation.lighteval_chat import NanoChatEngineModel, chat_tasks_table

__all__ = ["NanoChatEngineModel", "TASKS_TABLE"]

TASKS_TABLE = chat_tasks_table()
