"""The training loop, once, for every task (classifier, SD3, CLIP, SAM), on Hugging Face Accelerate.

A task plugs in by subclassing `Task`:

    class MyTask(Task):
        name = "my-task"                               # recorded in run.json and the model card

        def build(self, args, accelerator) -> TaskSetup:
            # Build the model WITH its adapters (methods.apply_method / the timm tag), only the
            # adapters (+ a new head) trainable, and the training dataset. Called on every process.
            return TaskSetup(model=model, train_dataset=dataset, collate_fn=None)

        def loss(self, model, batch) -> torch.Tensor:
            # One micro-batch (already on the device, inside autocast): a scalar loss.
            ...

        # optional:
        def evaluate(self, model, accelerator) -> dict[str, float]: ...   # called on every process
        def save(self, model, output_dir) -> Path: ...                    # main process only
        def card(self) -> dict: ...                                       # facts for the model card/summary
        def fingerprint(self) -> dict: ...                                # what makes two runs "the same"

    result = train(MyTask(...), TrainingArguments(output_dir="out", max_train_steps=100))

What the engine does with it (`train`):
- `Accelerator(mixed_precision, gradient_accumulation_steps)`: one device as it is, DDP under
  `accelerate launch --num_processes N -m serial_lora_train.<task>`, FSDP1 through accelerate's config with
  `fsdp_use_orig_params: true` (FSDP otherwise needs one requires_grad per wrapped unit, which a frozen
  base with trainable adapters breaks); under FSDP evaluation gets the wrapped model, the main process
  saves a fresh `build` holding the gathered trainable parameters, and checkpoints are refused (use DDP).
- AdamW over the trainable parameters; with `lora_plus_ratio` the B matrices learn that many times faster
  (LoRA+) for Serial LoRA and PEFT LoRA alike (`methods.parameter_groups`). The LR schedule is
  diffusers' `get_scheduler` (constant by default: the paper uses a fixed learning rate).
- Data: a seeded, endless batch sampler (`data.EpochBatchSampler`) shards the samples over the processes
  (one DataLoader iterator for the whole run: workers prefetch across epochs); the data position is the
  number of micro-batches consumed, so a resumed run sees exactly the batches it would have seen. Each sample's random augmentation is seeded from (seed, epoch, index), independent of worker
  count and of where the run was resumed.
- Checkpoints every `checkpointing_steps` optimizer steps in `output_dir/checkpoints/checkpoint-<step>`:
  the trainable parameters only (never the frozen base), optimizer, scheduler, every process's RNG
  state and the data position; written into a temporary folder that is renamed into place (a crash
  while writing leaves the previous checkpoint intact); `checkpoints_total_limit` keeps the newest.
  `resume_from_checkpoint="latest"` or a path continues bit-identically on CPU with the same seed and
  number of processes (starting a run over its own checkpoints without it is refused).
- Output (main process only): the task's adapter file, `metrics.jsonl` (one JSON object per logged step
  / evaluation), `run.json` (the run's settings: a different run refuses to write into the folder
  unless `overwrite_output_dir`), a model card `README.md` next to the adapter, a tqdm bar and a
  summary table.

Mixed precision default: "bf16" when a CUDA GPU supports it, else "no" (CPU bf16 autocast works in torch
but is slower than float32 on most CPUs, and float32 keeps CPU runs bit-reproducible).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from serial_lora_core import SerialLoraError
from serial_lora_core.format import atomic_write

from .data import EpochBatchSampler, SeededSamples

CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CARD_FILE = "README.md"
_STATE = "state.json"
_TRAINABLE = "trainable.safetensors"
_OPTIMIZER = "optimizer.safetensors"

# Settings that may change between a run and its continuation without making it "a different run".
_RESUMABLE_KEYS = frozenset({
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "max_train_steps", "num_train_epochs",
    "checkpointing_steps", "checkpoints_total_limit", "dataloader_num_workers", "pin_memory", "logging_steps",
    "validation_steps", "disable_progress_bar", "mixed_precision",
})


def default_mixed_precision() -> str:
    """"bf16" on a CUDA GPU that supports it, else "no" (see the module docstring)."""
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


@dataclass
class TrainingArguments:
    """Hyper-parameters of a run, named as diffusers' training scripts and PEFT name them.

    Paper defaults (classification): rank 32, learning_rate 2e-4, dropout 0.25, constant schedule.
    `max_train_steps` wins over `num_train_epochs` when both are given.
    """

    output_dir: str
    method: str = "serial"
    rank: int = 32
    alpha: float | None = None
    dropout: float = 0.25
    lora_plus_ratio: float | None = None
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_train_steps: int | None = None
    num_train_epochs: int = 1
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    mixed_precision: str | None = None
    seed: int = 0
    checkpointing_steps: int = 0
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    validation_steps: int = 0
    logging_steps: int = 1
    dataloader_num_workers: int = 0
    pin_memory: bool | None = None
    overwrite_output_dir: bool = False
    disable_progress_bar: bool = False

    def __post_init__(self) -> None:
        positive = ("rank", "train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "logging_steps")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("checkpointing_steps", "validation_steps", "lr_warmup_steps", "dataloader_num_workers", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.max_train_steps is not None and (not isinstance(self.max_train_steps, int) or self.max_train_steps < 1):
            raise ValueError(f"max_train_steps must be a positive integer, got {self.max_train_steps!r}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"checkpoints_total_limit must be >= 1 (or None to keep all), got {self.checkpoints_total_limit}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.lora_plus_ratio is not None and not self.lora_plus_ratio > 0:
            raise ValueError(f"lora_plus_ratio must be positive (the paper uses 20), got {self.lora_plus_ratio}")
        if self.alpha is not None and not self.alpha > 0:  # scaling alpha/rank = 0 would leave nothing to train
            raise ValueError(f"alpha must be positive (scaling = alpha/rank; default alpha = rank), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        from .methods import METHODS  # noqa: PLC0415  (methods imports this module's neighbours only)

        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if self.mixed_precision is None:
            self.mixed_precision = default_mixed_precision()
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_namespace(cls, namespace: argparse.Namespace) -> "TrainingArguments":
        """The fields of `namespace` (as parsed by `add_training_arguments`) that this class knows."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(namespace).items() if k in names})


def add_training_arguments(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """The engine's command-line options (diffusers' spellings); `defaults` overrides per task, e.g. rank=64."""
    d = {f.name: f.default for f in dataclasses.fields(TrainingArguments) if f.default is not dataclasses.MISSING}
    d.update(defaults)
    g = parser.add_argument_group("training (Accelerate)")
    g.add_argument("--output-dir", "--output_dir", dest="output_dir", required="output_dir" not in d,
                   default=d.get("output_dir"), help="folder for the adapter, metrics, checkpoints and model card")
    g.add_argument("--method", choices=("serial", "lora"), default=d["method"],
                   help="serial: Serial LoRA (one shared pair per attention input); lora: PEFT LoRA on q,k,v,o")
    g.add_argument("--rank", type=int, default=d["rank"], help=f"adapter rank (default {d['rank']})")
    g.add_argument("--alpha", type=float, default=d["alpha"], help="scaling numerator, scaling = alpha/rank (default: rank)")
    g.add_argument("--dropout", type=float, default=d["dropout"], help=f"adapter input dropout (default {d['dropout']})")
    g.add_argument("--lora-plus-ratio", dest="lora_plus_ratio", type=float, default=d["lora_plus_ratio"],
                   help="LoRA+: B learns this many times faster than A (the paper uses 20)")
    g.add_argument("--learning-rate", "--learning_rate", dest="learning_rate", type=float, default=d["learning_rate"])
    g.add_argument("--weight-decay", dest="weight_decay", type=float, default=d["weight_decay"])
    g.add_argument("--max-grad-norm", dest="max_grad_norm", type=float, default=d["max_grad_norm"],
                   help="gradient clipping (0 disables)")
    g.add_argument("--train-batch-size", "--train_batch_size", dest="train_batch_size", type=int,
                   default=d["train_batch_size"], help="per-process batch size")
    g.add_argument("--gradient-accumulation-steps", dest="gradient_accumulation_steps", type=int,
                   default=d["gradient_accumulation_steps"])
    g.add_argument("--max-train-steps", "--max_train_steps", dest="max_train_steps", type=int, default=d["max_train_steps"],
                   help="optimizer steps (overrides --num-train-epochs)")
    g.add_argument("--num-train-epochs", dest="num_train_epochs", type=int, default=d["num_train_epochs"])
    g.add_argument("--lr-scheduler", dest="lr_scheduler", default=d["lr_scheduler"],
                   help="diffusers scheduler name: constant, constant_with_warmup, cosine, linear, ...")
    g.add_argument("--lr-warmup-steps", dest="lr_warmup_steps", type=int, default=d["lr_warmup_steps"])
    g.add_argument("--mixed-precision", dest="mixed_precision", choices=("no", "fp16", "bf16"), default=d["mixed_precision"],
                   help="default: bf16 on a CUDA GPU that supports it, else no")
    g.add_argument("--seed", type=int, default=d["seed"])
    g.add_argument("--checkpointing-steps", dest="checkpointing_steps", type=int, default=d["checkpointing_steps"],
                   help="save a resumable checkpoint every N optimizer steps (0: never)")
    g.add_argument("--checkpoints-total-limit", dest="checkpoints_total_limit", type=int,
                   default=d["checkpoints_total_limit"], help="keep only the newest N checkpoints")
    g.add_argument("--resume-from-checkpoint", "--resume", dest="resume_from_checkpoint",
                   default=d["resume_from_checkpoint"], help="'latest' or a checkpoint folder")
    g.add_argument("--validation-steps", dest="validation_steps", type=int, default=d["validation_steps"],
                   help="evaluate every N optimizer steps (0: only at the end)")
    g.add_argument("--logging-steps", dest="logging_steps", type=int, default=d["logging_steps"])
    g.add_argument("--dataloader-num-workers", dest="dataloader_num_workers", type=int,
                   default=d["dataloader_num_workers"])
    g.add_argument("--overwrite-output-dir", "--overwrite", dest="overwrite_output_dir", action="store_true",
                   help="allow writing into a folder that holds a different run")
    g.add_argument("--disable-progress-bar", dest="disable_progress_bar", action="store_true")


@dataclass
class TaskSetup:
    """What `Task.build` returns: the adapted model and the training data."""

    model: nn.Module
    train_dataset: Any
    collate_fn: Callable[[list], Any] | None = None


class Task:
    """A training task. Subclass it: implement `build` and `loss`, override the rest as needed."""

    name: str = "task"
    global_step: int = 0
    """Set by the engine before each `evaluate` (e.g. to name validation images by step)."""

    def build(self, args: TrainingArguments, accelerator: Any) -> TaskSetup:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, accelerator: Any) -> dict[str, float]:
        """Validation metrics (e.g. {"val_loss": .., "top1": ..}).

        Runs on every process under no_grad and autocast, with the unwrapped model in eval mode (under
        FSDP the wrapped one, whose forward gathers the shards). `self.global_step` holds the current step.
        """
        return {}

    def save(self, model: nn.Module, output_dir: Path) -> Path:
        """Write the trained adapter into `output_dir` (main process only, a plain unwrapped model; under FSDP
        a fresh `build` holding the trained parameters); return the file's path."""
        raise NotImplementedError

    def card(self) -> dict[str, Any]:
        """Facts for the model card and the summary table: base_model, data, parameter counts, notes."""
        return {}

    def fingerprint(self) -> dict[str, Any]:
        """Task settings that define the run (model, data, ...): a folder holding another run is refused."""
        return {}


@dataclass
class TrainResult:
    """What `train` returns (on every process; files are written by the main process)."""

    adapter_path: Path | None
    global_step: int
    train_loss: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    trainable_parameters: int = 0
    summary: str = ""
    model: nn.Module | None = None
    """The trained model (unwrapped from DDP), e.g. to compare its outputs with the saved file's."""


def classification_scores(loader: Any, logits_of: Callable[[torch.Tensor], torch.Tensor],
                          device: torch.device) -> tuple[float, float]:
    """(top-1 accuracy, mean cross-entropy) of `logits_of(images)` over the (images, labels) batches of
    `loader`: the evaluation of the classification tasks (classifier, CLIP)."""
    total, correct, loss = 0, 0, 0.0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = logits_of(images).float()
        loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        total += len(labels)
    return correct / total, loss / total


# ----------------------------------------------------------------------------------------------------------
# Files


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` all-or-nothing (through the project's one atomic writer)."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _run_identity(task: Task, args: TrainingArguments) -> dict[str, Any]:
    settings = {k: v for k, v in args.to_dict().items() if k not in _RESUMABLE_KEYS}
    return {"task": task.name, "arguments": settings, "task_settings": task.fingerprint()}


def check_output_dir(task: Task, args: TrainingArguments) -> None:
    """Refuse an output folder that holds a different run (unless `overwrite_output_dir`); changes nothing."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {str(out)!r} is a file; pass a folder")
    if args.overwrite_output_dir or not out.is_dir() or not any(out.iterdir()):
        return
    run_file = out / RUN_FILE
    ours = json.loads(json.dumps(_run_identity(task, args)))
    if not run_file.is_file():
        raise ValueError(f"output_dir {str(out)!r} is not empty and holds no {RUN_FILE} of a serial-lora run; "
                         "choose an empty folder, or pass --overwrite-output-dir to write into it anyway")
    try:
        theirs = json.loads(run_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{run_file}: unreadable ({err}); pass --overwrite-output-dir to replace the run") from err
    if theirs != ours:
        diff = _differences(theirs, ours)
        raise ValueError(f"output_dir {str(out)!r} holds a different run ({'; '.join(diff[:5])}); choose another "
                         "folder, or pass --overwrite-output-dir to replace it")
    if args.resume_from_checkpoint is None and list_checkpoints(out):
        # Starting over would mix new checkpoints with the old ones, and "latest" could pick a stale one.
        raise ValueError(f"output_dir {str(out)!r} holds checkpoints of this run; pass --resume-from-checkpoint "
                         "latest to continue it, or --overwrite-output-dir to start it over")


def _differences(theirs: Any, ours: Any, prefix: str = "") -> list[str]:
    if isinstance(theirs, dict) and isinstance(ours, dict):
        out = []
        for key in sorted(set(theirs) | set(ours), key=str):
            out += _differences(theirs.get(key), ours.get(key), f"{prefix}{key}.")
        return out
    return [] if theirs == ours else [f"{prefix.rstrip('.')}: {theirs!r} there, {ours!r} now"]


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(output_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        step = path.name.removeprefix(CHECKPOINT_PREFIX)
        if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX) and step.isdigit() and (path / _STATE).is_file():
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(args: TrainingArguments) -> Path | None:
    """The checkpoint folder `resume_from_checkpoint` names (None: start fresh)."""
    value = args.resume_from_checkpoint
    if value is None:
        return None
    if value == "latest":
        found = list_checkpoints(args.output_dir)
        return found[-1] if found else None  # as diffusers: "latest" with none starts a new run
    path = Path(value)
    if not (path / _STATE).is_file():
        raise ValueError(f"resume_from_checkpoint={value!r} is not a checkpoint folder (no {_STATE} in it); "
                         f"pass 'latest' or one of {[str(p) for p in list_checkpoints(args.output_dir)]}")
    return path


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    version, internal, gauss = random.getstate()
    info: dict[str, Any] = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["numpy"] = torch.from_numpy(keys.astype("int64"))
        info["numpy"] = [kind, int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return tensors, info


def _set_rng_state(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = info["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in info and "numpy" in tensors:
        import numpy as np

        kind, pos, has_gauss, cached = info["numpy"]
        np.random.set_state((kind, tensors["numpy"].numpy().astype("uint32"), pos, has_gauss, cached))


def _optimizer_to_files(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state_dict as safetensors tensors + JSON (no pickle)."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for source in (tensors, info["scalars"]):
        for name, value in source.items():
            index, key = name.split(".", 1)
            state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": info["param_groups"]}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of `model` (adapters and any new head) by name; never the frozen base."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(accelerator: Any, model: nn.Module, optimizer: Any, scheduler: Any, args: TrainingArguments,
                    step: int, position: int, extra: dict[str, Any] | None = None) -> Path | None:
    """Write checkpoint-<step> atomically (every process calls this; the main process writes the shared part)."""
    from safetensors.torch import save_file

    folder = Path(args.output_dir) / CHECKPOINTS
    final = folder / f"{CHECKPOINT_PREFIX}{step}"
    tmp = folder / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash while writing
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rng_tensors, rng_info = _rng_state()
    save_file(rng_tensors, str(tmp / f"rng_{accelerator.process_index}.safetensors"))
    _write_json(tmp / f"rng_{accelerator.process_index}.json", rng_info)
    opt_state = optimizer.state_dict()  # collective under FSDP; identical on every DDP process
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return None
    unwrapped = accelerator.unwrap_model(model)
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable_state(unwrapped).items()}, str(tmp / _TRAINABLE))
    opt_tensors, opt_info = _optimizer_to_files(opt_state)
    save_file(opt_tensors, str(tmp / _OPTIMIZER))
    _write_json(tmp / _STATE, {
        "global_step": step,
        "data_position": position,
        "num_processes": accelerator.num_processes,
        "optimizer": opt_info,
        "scheduler": _jsonable(scheduler.state_dict()),
        **(extra or {}),
    })
    _replace_dir(tmp, final)
    _prune_checkpoints(args)
    accelerator.wait_for_everyone()
    return final


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished `tmp` folder to `final`; an existing `final` is only removed once `tmp` is in place."""
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def _prune_checkpoints(args: TrainingArguments) -> None:
    if args.checkpoints_total_limit is None:
        return
    for path in list_checkpoints(args.output_dir)[: -args.checkpoints_total_limit]:
        shutil.rmtree(path)


def load_checkpoint(path: Path, accelerator: Any, model: nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore a checkpoint into the prepared objects; returns its state.json. Checks before changing anything."""
    from safetensors.torch import load_file

    state = json.loads((path / _STATE).read_text())
    if state.get("num_processes") != accelerator.num_processes:
        raise ValueError(f"{path} was written by {state.get('num_processes')} process(es), this run has "
                         f"{accelerator.num_processes}; resume with the same number of processes")
    unwrapped = accelerator.unwrap_model(model)
    params = trainable_state(unwrapped)
    saved = load_file(str(path / _TRAINABLE))
    if set(saved) != set(params):
        missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ValueError(f"{path / _TRAINABLE} does not match the model's trainable parameters (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}); resume with the settings of that run")
    for name, value in saved.items():
        if value.shape != params[name].shape:
            raise ValueError(f"{path / _TRAINABLE}: {name} has shape {tuple(value.shape)}, the model "
                             f"{tuple(params[name].shape)}; resume with the settings of that run")
    rank = accelerator.process_index
    rng_tensors = load_file(str(path / f"rng_{rank}.safetensors"))
    rng_info = json.loads((path / f"rng_{rank}.json").read_text())
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)
    optimizer.load_state_dict(_optimizer_from_files(load_file(str(path / _OPTIMIZER)), state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(rng_tensors, rng_info)
    return state


# ----------------------------------------------------------------------------------------------------------
# The loop


def _accelerator(args: TrainingArguments) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # Several runs in one process (experiments, tests) may differ in precision or accumulation; accelerate keeps
    # those in process-wide singletons that refuse a change, so start them afresh (the process group is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    # Without a GPU, `cpu=True` makes a multi-process launch (`accelerate launch --multi_gpu`, torchrun) a gloo
    # process group (MULTI_CPU); without it each CPU process would silently train alone.
    return Accelerator(mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps,
                       cpu=not torch.cuda.is_available())


def _uses_fsdp(accelerator: Any) -> bool:
    return getattr(accelerator.state, "fsdp_plugin", None) is not None


def _model_to_save(task: Task, args: TrainingArguments, accelerator: Any, model: nn.Module) -> nn.Module | None:
    """The model `task.save` gets on the main process (None elsewhere).

    Without FSDP: the unwrapped model. Under FSDP the wrapped modules' names and shards are not a plain
    model, so the main process rebuilds the task's model (same seed: the frozen base is identical) and copies
    the gathered trainable parameters into it.
    """
    if not _uses_fsdp(accelerator):
        return accelerator.unwrap_model(model) if accelerator.is_main_process else None
    state = accelerator.get_state_dict(model)  # collective; the full state, with plain names, on the main process
    if not accelerator.is_main_process:
        return None
    from accelerate.utils import set_seed

    set_seed(args.seed)
    fresh = task.build(args, accelerator).model
    params = trainable_state(fresh)
    missing = sorted(set(params) - set(state))
    if missing:
        raise SerialLoraError(f"FSDP state dict lacks trainable parameters {missing[:3]}; cannot save the adapter")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])
    return fresh


def _check_fsdp(accelerator: Any, args: TrainingArguments) -> None:
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None:
        return
    if getattr(plugin, "fsdp_version", 1) != 1:
        raise ValueError("FSDP: the trainer supports fsdp_version 1 with fsdp_use_orig_params: true; "
                         "set fsdp_version: 1 in the accelerate config, or use DDP")
    if not plugin.use_orig_params:
        raise ValueError("FSDP with a frozen base and trainable adapters needs use_orig_params (FSDP requires "
                         "uniform requires_grad per flat parameter otherwise): set fsdp_use_orig_params: true "
                         "in the accelerate config")
    if args.checkpointing_steps or args.resume_from_checkpoint:
        # Sharded optimizer state would need FSDP's own state-dict APIs; the adapters are small enough for DDP.
        raise ValueError("checkpoints are not supported under FSDP yet (checkpointing_steps/resume_from_checkpoint); "
                         "train with DDP (accelerate launch --multi_gpu) to checkpoint and resume")


def _make_scheduler(optimizer: torch.optim.Optimizer, args: TrainingArguments, total_steps: int) -> Any:
    from diffusers.optimization import get_scheduler

    try:
        return get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                             num_training_steps=total_steps)
    except ValueError as err:
        raise ValueError(f"lr_scheduler={args.lr_scheduler!r}: {err}") from err


def _dataloader(setup: TaskSetup, args: TrainingArguments, accelerator: Any) -> tuple[Any, EpochBatchSampler]:
    if len(setup.train_dataset) == 0:
        raise ValueError("the training dataset is empty; check the data arguments")
    # Fewer samples than a global batch are repeated to fill it (as DistributedSampler pads).
    sampler = EpochBatchSampler(len(setup.train_dataset), args.train_batch_size, seed=args.seed,
                                num_replicas=accelerator.num_processes, rank=accelerator.process_index, endless=True)
    pin = accelerator.device.type == "cuda" if args.pin_memory is None else args.pin_memory
    loader = torch.utils.data.DataLoader(
        SeededSamples(setup.train_dataset, args.seed), batch_sampler=sampler, collate_fn=setup.collate_fn,
        num_workers=args.dataloader_num_workers, pin_memory=pin,
        # Its own generator: creating the iterator (at the start, on resume) must not draw from the global RNG.
        generator=torch.Generator().manual_seed(args.seed),
    )
    return loader, sampler


def _on_device(batches: Iterator[Any], device: torch.device) -> Iterator[Any]:
    """The batches on `device`; on CUDA each is copied one step ahead on a side stream, so the host-to-device
    copy of step i+1 overlaps the compute of step i instead of delaying it."""
    from accelerate.utils import send_to_device
    from accelerate.utils.operations import recursively_apply

    if device.type != "cuda":
        for batch in batches:
            yield send_to_device(batch, device)
        return
    stream = torch.cuda.Stream(device)
    end = object()

    def copy_next() -> Any:
        host = next(batches, end)
        if host is end:
            return end
        with torch.cuda.stream(stream):
            return send_to_device(host, device, non_blocking=True)

    ahead = copy_next()
    while ahead is not end:
        current = torch.cuda.current_stream(device)
        current.wait_stream(stream)
        # The tensors were allocated on the side stream: tell the allocator the compute stream uses them.
        recursively_apply(lambda t: t.record_stream(current), ahead)
        batch, ahead = ahead, copy_next()
        yield batch


def train(task: Task, args: TrainingArguments) -> TrainResult:
    """Train `task` under `args`; see the module docstring."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from .methods import parameter_groups

    check_output_dir(task, args)
    resume = resolve_checkpoint(args)
    accelerator = _accelerator(args)
    _check_fsdp(accelerator, args)
    fsdp = _uses_fsdp(accelerator)
    set_seed(args.seed)
    setup = task.build(args, accelerator)
    model = setup.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise SerialLoraError(f"task {task.name!r} built a model with no trainable parameter")
    trainable_count = sum(p.numel() for p in trainable)
    loader, sampler = _dataloader(setup, args, accelerator)
    steps_per_epoch = math.ceil(len(sampler) / args.gradient_accumulation_steps)
    total_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(
        parameter_groups(model, args.learning_rate, args.lora_plus_ratio, args.weight_decay),
        lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
    )
    scheduler = _make_scheduler(optimizer, args, total_steps)
    # The scheduler is stepped by hand once per optimizer step (accelerate's wrapper would step it once per process).
    model, optimizer = accelerator.prepare(model, optimizer)

    out = Path(args.output_dir)
    step, position = 0, 0
    if resume is not None:
        state = load_checkpoint(resume, accelerator, model, optimizer, scheduler)
        step, position = state["global_step"], state["data_position"]
    if accelerator.is_main_process:
        if args.resume_from_checkpoint is not None:  # say what resuming did, as diffusers' scripts do
            print(f"resuming from {resume} (step {step})" if resume is not None else
                  f"resume_from_checkpoint={args.resume_from_checkpoint!r}: no checkpoint in {out / CHECKPOINTS}; "
                  "starting a new training run", file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / RUN_FILE, _run_identity(task, args))
        if resume is None:  # a fresh run (over an old one only with --overwrite-output-dir) starts clean
            (out / METRICS_FILE).unlink(missing_ok=True)
            if (out / CHECKPOINTS).is_dir():
                shutil.rmtree(out / CHECKPOINTS)
    accelerator.wait_for_everyone()

    log = _MetricsLog(out / METRICS_FILE, accelerator.is_main_process)
    bar = tqdm(total=total_steps, initial=step, desc=task.name, unit="step",
               disable=args.disable_progress_bar or not accelerator.is_local_main_process)
    running, count, train_loss = None, 0, None
    metrics: dict[str, float] = {}
    started = time.perf_counter()
    model.train()
    # One endless iterator from the data position on: workers keep prefetching across epoch boundaries.
    sampler.set_position(position)
    batches = _on_device(iter(loader), accelerator.device)
    while step < total_steps:
        batch = next(batches)
        with accelerator.accumulate(model):
            loss = task.loss(model, batch)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm:
                # Under FSDP all of the wrapped model's parameters: accelerate then uses FSDP's own clipping,
                # whose norm spans the shards.
                accelerator.clip_grad_norm_(model.parameters() if fsdp else trainable, args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        position += 1
        detached = loss.detach().float()
        running = detached if running is None else running + detached
        count += 1
        if not accelerator.sync_gradients:
            continue
        if not accelerator.optimizer_step_was_skipped:
            scheduler.step()
        step += 1
        bar.update(1)
        if step % args.logging_steps == 0 or step == total_steps:
            train_loss = accelerator.reduce(running / count, reduction="mean").item()
            running, count = None, 0
            record = {"step": step, "loss": train_loss, "lr": scheduler.get_last_lr()[0],
                      "epoch": position / len(sampler), "elapsed_s": round(time.perf_counter() - started, 3)}
            log.write(record)
            bar.set_postfix(loss=f"{train_loss:.4f}")
        if args.validation_steps and step % args.validation_steps == 0 and step != total_steps:
            metrics = _evaluate(task, model, accelerator, step, log)
        if args.checkpointing_steps and step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, model, optimizer, scheduler, args, step, position)
    bar.close()
    metrics = _evaluate(task, model, accelerator, step, log)
    accelerator.wait_for_everyone()
    adapter_path = None
    summary = ""
    trained = _model_to_save(task, args, accelerator, model)
    if accelerator.is_main_process:
        adapter_path = task.save(trained, out)
        facts = {"trainable_parameters": trainable_count, "processes": accelerator.num_processes, **task.card()}
        summary = summary_table(task, args, facts, train_loss, metrics)
        write_model_card(out / CARD_FILE, task, args, facts, train_loss, metrics, adapter_path, step)
        print(summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(adapter_path, step, train_loss, metrics, trainable_count, summary,
                       trained if trained is not None else accelerator.unwrap_model(model))


def _evaluate(task: Task, model: nn.Module, accelerator: Any, step: int, log: "_MetricsLog") -> dict[str, float]:
    model.eval()
    task.global_step = step  # for tasks that name their outputs by step (SD3's validation images)
    # Under FSDP only the wrapped model's forward gathers the shards.
    evaluated = model if _uses_fsdp(accelerator) else accelerator.unwrap_model(model)
    with torch.no_grad(), accelerator.autocast():
        metrics = task.evaluate(evaluated, accelerator)
    model.train()
    if metrics:
        log.write({"step": step, **metrics})
    return metrics


class _MetricsLog:
    """metrics.jsonl: one JSON object per line, appended (resumed runs continue the same file)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Summary and model card


def _rows(task: Task, args: TrainingArguments, facts: dict[str, Any], train_loss: float | None,
          metrics: dict[str, float]) -> list[tuple[str, str]]:
    rows = [("task", task.name), ("method", facts.get("method_label", args.method)), ("rank", str(args.rank))]
    labels = {"base_model": "base model", "adapter_parameters": "adapter parameters",
              "trainable_parameters": "trainable parameters", "lora_parameters_note": "vs LoRA at this rank",
              "processes": "processes"}
    for key, label in labels.items():
        if key in facts:
            value = facts[key]
            rows.append((label, f"{value:,}" if isinstance(value, int) else str(value)))
    rows.append(("train loss", "-" if train_loss is None else f"{train_loss:.4f}"))
    rows += [(k.replace("_", " "), f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    rows += [(str(k), str(v)) for k, v in facts.get("summary_rows", {}).items()]
    return rows


def summary_table(task: Task, args: TrainingArguments, facts: dict[str, Any], train_loss: float | None,
                  metrics: dict[str, float]) -> str:
    """The final summary as a two-column text table."""
    rows = _rows(task, args, facts, train_loss, metrics)
    width = max(len(k) for k, _ in rows)
    rule = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([rule, *(f"{k:<{width}}  {v}" for k, v in rows), rule])


def write_model_card(path: Path, task: Task, args: TrainingArguments, facts: dict[str, Any],
                     train_loss: float | None, metrics: dict[str, float], adapter_path: Path | None, step: int) -> None:
    """README.md next to the adapter, as diffusers' training scripts write (YAML header + facts)."""
    base = facts.get("base_model")
    header = ["---", "library_name: serial-lora", "tags:", "- serial-lora", f"- {task.name}"]
    if base:
        header.append(f"base_model: {json.dumps(str(base))}")
    header.append("---")
    rows = _rows(task, args, facts, train_loss, metrics)
    settings = {k: getattr(args, k) for k in ("learning_rate", "lora_plus_ratio", "dropout", "alpha", "train_batch_size",
                                             "gradient_accumulation_steps", "mixed_precision", "seed", "lr_scheduler")}
    lines = [
        *header, "",
        f"# {facts.get('title', f'Serial LoRA ({task.name})')}", "",
        f"Adapter file: `{adapter_path.name if adapter_path else '-'}`, trained for {step} optimizer steps.",
        "",
        "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
        f"Data: {facts.get('data', '-')}", "",
        "Training settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()), "",
        *(facts.get("usage", []) or []),
    ]
    atomic_write_bytes(path, ("\n".join(lines).rstrip() + "\n").encode())


def run_cli(task: Task, args: TrainingArguments) -> int:
    """Run `train` for a command-line entry point: clear one-line errors, exit status 2 on bad input."""
    try:
        train(task, args)
    except (ValueError, TypeError, SerialLoraError) as err:
        print(f"serial-lora: error: {err}", file=sys.stderr)
        return 2
    return 0


__all__ = [
    "Task",
    "TaskSetup",
    "TrainResult",
    "TrainingArguments",
    "add_training_arguments",
    "check_output_dir",
    "classification_scores",
    "default_mixed_precision",
    "list_checkpoints",
    "load_checkpoint",
    "run_cli",
    "save_checkpoint",
    "summary_table",
    "train",
    "trainable_state",
    "write_model_card",
]

