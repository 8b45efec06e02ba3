"""Trainers for Serial LoRA (and the PEFT LoRA baseline) on Hugging Face Accelerate.

`engine` holds the one training loop (checkpoints, resume, metrics, model card); each task
(`classifier`, `sd3`, `clip`, `sam`) is a thin `engine.Task` on top of it, reachable as
`serial-lora train-<task>` and `python -m serial_lora_train.<task>` (for `accelerate launch -m`).
Framework libraries (accelerate, timm, diffusers, peft) are imported by the tasks that need them.
"""

from .engine import Task, TaskSetup, TrainingArguments, TrainResult, add_training_arguments, train
from .methods import METHODS, MethodInfo, apply_method, parameter_groups

__all__ = [
    "METHODS",
    "MethodInfo",
    "Task",
    "TaskSetup",
    "TrainResult",
    "TrainingArguments",
    "add_training_arguments",
    "apply_method",
    "parameter_groups",
    "train",
]
