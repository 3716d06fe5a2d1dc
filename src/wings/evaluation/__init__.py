"""Evaluation: task files, MC/generative scoring, forgetting report, IIT-style benchmark, MLLM-LAWS, lm-eval adapter.

The lm-evaluation-harness adapter lives in `wings.evaluation.lm_eval_adapter` (needs the `eval` extra) and is
not imported here.
"""

from .models import EvalModel, load_eval_model
from .runner import TaskResult, evaluate_task
from .stats import wilson_interval
from .tasks import Task, TaskError, TaskItem, load_task

__all__ = [
    "EvalModel",
    "Task",
    "TaskError",
    "TaskItem",
    "TaskResult",
    "evaluate_task",
    "load_eval_model",
    "load_task",
    "wilson_interval",
]
