"""The command-line entry of a task module (`main(args)` and `python -m serial_lora_train.<task>`), written once."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable

from .engine import Task, TrainingArguments, add_training_arguments, run_cli


def task_main(args: argparse.Namespace, make_task: Callable[[], Task]) -> int:
    """Build the `TrainingArguments` and the task from parsed arguments, then train; bad input exits with
    status 2 and one clear line on stderr (nothing is written)."""
    try:
        training = TrainingArguments.from_namespace(args)
        task = make_task()
    except (ValueError, TypeError) as err:
        print(f"serial-lora: error: {err}", file=sys.stderr)
        return 2
    return run_cli(task, training)


def task_parser(prog: str, description: str | None, add_arguments: Callable[[argparse.ArgumentParser], None]
                ) -> argparse.ArgumentParser:
    """The stand-alone parser of a task (`python -m serial_lora_train.<task> --help`)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def options_from(cls: type, args: argparse.Namespace) -> Any:
    """The task's options dataclass `cls`, filled from the parsed arguments of the same names."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


PAPER_DEFAULTS: dict[str, Any] = {"rank": 32, "learning_rate": 2e-4, "dropout": 0.25}
"""The paper's hyper-parameters for the ViT, CLIP and SAM tasks: the engine defaults of those trainers."""


def task_entry(task: Callable[[Any], Task], options: type) -> Callable[[argparse.Namespace], int]:
    """The `main(args)` of a task module whose task is built as `task(options(...))` from parsed arguments."""

    def main(args: argparse.Namespace) -> int:
        """Run the trainer from parsed arguments; bad input exits with status 2 and one clear line."""
        return task_main(args, lambda: task(options_from(options, args)))

    return main


def add_data_arguments(parser: argparse.ArgumentParser, group: argparse._ArgumentGroup, *, eval_batch_size: int,
                       bad: str, train_batch_size: int) -> None:
    """`--skip-bad-images` (skipping `bad`, counted in the summary) and `--eval-batch-size` in `group`, then the
    engine's options with the paper's defaults (`PAPER_DEFAULTS`) and the task's `train_batch_size`."""
    group.add_argument("--skip-bad-images", dest="skip_bad_images", action="store_true",
                       help=f"skip {bad} (counted in the summary) instead of stopping")
    group.add_argument("--eval-batch-size", dest="eval_batch_size", type=int, default=eval_batch_size)
    add_training_arguments(parser, **PAPER_DEFAULTS, train_batch_size=train_batch_size)
