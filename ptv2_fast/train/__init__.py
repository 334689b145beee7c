"""P-Tuning v2 end to end: embedded tasks, training (one or many tasks in one run; sequence or token
classification, or causal LM) and batched prediction (labels, tags or generated completions).

``ptv2-fast train`` / ``ptv2-fast predict`` are the command-line faces of ``train`` and ``Predictor``.
Needs the hf extra (transformers, safetensors).
"""

from .data import load_hub_task, load_task, load_task_file
from .synthetic import GENERATORS, Task, make_task
from .trainer import Predictor, TrainConfig, evaluate, format_summary, train

__all__ = ["GENERATORS", "Predictor", "Task", "TrainConfig", "evaluate", "format_summary", "load_hub_task",
           "load_task", "load_task_file", "make_task", "train"]
