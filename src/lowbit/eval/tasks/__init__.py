"""Zero-shot tasks (HellaSwag, ARC, PIQA, WinoGrande, LAMBADA) scored as lm-evaluation-harness 0.4 scores them.

``evaluate_tasks(models, tokenizer, ["arc_easy", "hellaswag=PATH"], limit=500)`` returns
``{model: {task: TaskResult}}``: lm-eval's prompts, tokenization, metrics and standard errors, with
every choice of a question (and of several questions) scored in one forward pass over their shared
prefixes. See :mod:`lowbit.eval.tasks.runner`.
"""

from lowbit.eval.tasks.base import Doc, TaskData, TaskSpec
from lowbit.eval.tasks.registry import TASKS, get_task, load_task, load_tasks, parse_tasks
from lowbit.eval.tasks.runner import TaskResult, evaluate_tasks

__all__ = ["TASKS", "Doc", "TaskData", "TaskResult", "TaskSpec", "evaluate_tasks", "get_task", "load_task",
           "load_tasks", "parse_tasks"]
