"""The command-line entry of a task module (`main(args)` and `python -m serial_lora_train.<task>`), written once."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable

from .engine import Task, TrainingArguments, run_cli


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


def add_data_arguments(group: argparse._ArgumentGroup, *, eval_batch_size: int, bad: str) -> None:
    """`--skip-bad-images` (skipping `bad`, counted in the summary) and `--eval-batch-size`."""
    group.add_argument("--skip-bad-images", dest="skip_bad_images", action="store_true",
                       help=f"skip {bad} (counted in the summary) instead of stopping")
    group.add_argument("--eval-batch-size", dest="eval_batch_size", type=int, default=eval_batch_size)
