"""`serial-lora train-classifier`: fine-tune any timm `<arch>.serial_lora` image classifier (the paper's CLIP setup).

    serial-lora train-classifier --model vit_base_patch16_clip_224 --pretrained \\
        --train-dir data/train --val-dir data/val --shots 16 --seed 0 --output-dir out
    accelerate launch --num_processes 2 -m serial_lora_train.classifier ...   # DDP

The base comes from timm (`--pretrained`, or `--pretrained-file PATH` through timm's
`pretrained_cfg_overlay=dict(file=...)`); a new head for the folder's classes is trained with the adapter
and stored in the adapter file, so `timm.create_model("<arch>.serial_lora", serial_lora_weights=FILE)`
rebuilds the trained classifier. Preprocessing is timm's own `resolve_data_config` / `create_transform`.
`--method lora` trains PEFT's LoRA on qkv + proj of the same blocks instead (saved with PEFT's
`save_pretrained`, head included as `modules_to_save`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from serial_lora_core import ARCHITECTURE_ATTRIBUTE, save_serial_lora

from .data import few_shot_indices, image_folder_dataset, scan_train_val
from .engine import Task, TaskSetup, TrainingArguments, classification_scores
from .entry import add_data_arguments, task_entry, task_parser
from .methods import PEFT_DIR, MethodInfo, apply_method, peft_usage, save_peft

ADAPTER_FILE = "serial_lora.safetensors"


@dataclass
class ClassifierOptions:
    """What the classifier task needs beyond `TrainingArguments`."""

    model: str
    train_dir: str
    val_dir: str | None = None
    pretrained: bool = False
    pretrained_file: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    shots: int | None = None
    skip_bad_images: bool = False
    augment: bool = True
    eval_batch_size: int = 64


def create_timm_model(model: str, *, pretrained: bool, pretrained_file: str | None, model_kwargs: dict[str, Any],
                      **kwargs: Any) -> nn.Module:
    """`timm.create_model(model, ...)`, local base weights (`--pretrained-file`) through timm's
    `pretrained_cfg_overlay`. Base weights that cannot be had give one ValueError saying what to do instead of a
    traceback: weights that do not fit the architecture (the first mismatch, not torch's list of every key), an
    unreadable file, or timm's weights that cannot be downloaded (offline)."""
    import timm
    from safetensors import SafetensorError

    kwargs = dict(model_kwargs, **kwargs)
    if pretrained_file is not None:
        pretrained = True
        # custom_load: a .npz is timm's JAX format; anything else a state dict, even for architectures whose hub
        # weights are .npz (timm < 1.0.31 kept their custom loader for a local file and failed on it).
        overlay: dict[str, Any] = dict(file=str(pretrained_file), custom_load=Path(pretrained_file).suffix == ".npz")
        classes = file_classifier_size(model, pretrained_file)
        if classes is not None:  # timm then keeps the file's head if the sizes agree, else starts a new one
            overlay["num_classes"] = classes
        kwargs["pretrained_cfg_overlay"] = overlay
    try:
        return timm.create_model(model, pretrained=pretrained, **kwargs)
    except OSError as err:
        if not pretrained or pretrained_file is not None:
            raise
        raise ValueError(f"--pretrained: timm's weights of {model!r} could not be downloaded ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]}); connect to the Hugging Face Hub, or have them in the cache "
                         "(HF_HUB_OFFLINE=1), or pass local weights with --pretrained-file PATH") from err
    except (RuntimeError, SafetensorError) as err:
        if pretrained_file is None:
            raise
        if "state_dict" not in str(err):
            raise ValueError(f"--pretrained-file {str(pretrained_file)!r} is not readable as weights "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); pass a .safetensors (or "
                             f"weights-only .pth) state dict of {model!r}") from err
        problems = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        first = problems[0] if problems else str(err)
        raise ValueError(f"--pretrained-file {str(pretrained_file)!r} does not fit --model {model!r} with --model-kwargs "
                         f"{json.dumps(model_kwargs)} ({len(problems)} problem(s); first: "
                         f"{first[:240]}{'...' if len(first) > 240 else ''}); pass the architecture and the "
                         "--model-kwargs (depth, embed_dim, img_size, ...) the weights were saved with") from err


def file_classifier_size(model: str, path: str | Path) -> int | None:
    """Outputs of the classifier stored in a local .safetensors base-weights file (None: no such tensor, or not a
    safetensors file). timm's `pretrained_cfg_overlay` needs it when the file's head was trained for other classes
    than the architecture's default (e.g. 400 instead of 1000)."""
    from safetensors import SafetensorError, safe_open
    from timm.models import get_pretrained_cfg
    from timm_plugin.factory import classifier_names

    cfg = get_pretrained_cfg(model)
    key = f"{classifier_names(cfg.to_dict() if cfg is not None else None)[0]}.weight"
    try:
        with safe_open(str(path), "pt") as handle:
            return int(handle.get_slice(key).get_shape()[0]) if key in handle.keys() else None
    except (SafetensorError, OSError):
        return None  # not a safetensors file: timm reads it (or says why it cannot)


class Normalize:
    """uint8 images (on the device) to the model's normalised float input, with torchvision's functions."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = list(mean), list(std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        return TF.normalize(TF.to_dtype(images, torch.float32, scale=True), self.mean, self.std)


class ClassifierTask(Task):
    """Image classification with a timm ViT-family model: cross-entropy, top-1 on the validation folder."""

    name = "classifier"

    def __init__(self, options: ClassifierOptions) -> None:
        import timm  # noqa: F401  (fail early with the import error if the timm extra is missing)
        import timm_plugin

        if options.model not in timm_plugin.SERIAL_LORA_ARCHITECTURES:
            raise ValueError(f"--model {options.model!r} is not an architecture of the timm plugin; choose one of "
                             "timm.list_models('*.serial_lora', include_tags=True), e.g. vit_base_patch16_clip_224")
        if options.pretrained_file is not None and not Path(options.pretrained_file).is_file():
            raise ValueError(f"--pretrained-file {options.pretrained_file!r} does not exist")
        self.options = options
        # Checked here, before any model or training is set up.
        self.train_scan, self.val_scan = scan_train_val(options.train_dir, options.val_dir, shots=options.shots,
                                                        skip_bad_images=options.skip_bad_images)
        self.indices: list[int] | None = None  # the shots build() draws with the run's seed
        self.info: MethodInfo | None = None
        self.classifier_names: tuple[str, ...] = ()
        self.val_set = None
        self.args: TrainingArguments | None = None

    @property
    def num_classes(self) -> int:
        return len(self.train_scan.classes)

    def create_base(self) -> nn.Module:
        """The timm model with a new head for the folder's classes, base weights as asked."""
        o = self.options
        model = create_timm_model(o.model, pretrained=o.pretrained, pretrained_file=o.pretrained_file,
                                  model_kwargs=o.model_kwargs, num_classes=self.num_classes)
        setattr(model, ARCHITECTURE_ATTRIBUTE, o.model)
        return model

    def data_config(self, model: nn.Module) -> dict[str, Any]:
        """timm's preprocessing settings of `model` (input size, interpolation, crop, mean/std)."""
        from timm.data import resolve_data_config

        overrides = {"img_size": self.options.model_kwargs["img_size"]} if "img_size" in self.options.model_kwargs else {}
        return resolve_data_config(overrides, model=model)

    def transform(self, config: dict[str, Any], training: bool) -> Any:
        """timm's transform ending in uint8 tensors (`use_prefetcher`, as timm's own training): 4x less to
        collate, pin and copy; `normalize` turns them into the model's input on the device."""
        from timm.data import create_transform

        return create_transform(**config, is_training=training and self.options.augment, use_prefetcher=True)

    def build(self, args: TrainingArguments, accelerator: Any) -> TaskSetup:
        from timm_plugin import unsupported_attention
        from timm_plugin.factory import classifier_names

        self.args = args
        if self.options.shots is not None:  # the draw follows the run's seed
            self.indices = few_shot_indices(self.train_scan.targets, self.options.shots, args.seed,
                                            self.train_scan.classes)
        model = self.create_base()
        problems = unsupported_attention(model)
        if problems:
            raise ValueError(f"--model {self.options.model!r}: {'; '.join(problems[:3])}")
        self.classifier_names = classifier_names(model)
        config = self.data_config(model)
        self.normalize = Normalize(config["mean"], config["std"])
        train_tf, eval_tf = self.transform(config, True), self.transform(config, False)
        model, self.info = apply_method(model, args.method, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                                        trainable_modules=self.classifier_names)
        dataset = image_folder_dataset(self.train_scan, train_tf)
        if self.indices is not None:
            dataset = torch.utils.data.Subset(dataset, self.indices)
        if self.val_scan is not None:
            self.val_set = image_folder_dataset(self.val_scan, eval_tf)
        return TaskSetup(model=model, train_dataset=dataset)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(model(self.normalize(images)), labels)

    def evaluate(self, model: nn.Module, accelerator: Any) -> dict[str, float]:
        if self.val_set is None:
            return {}
        loader = torch.utils.data.DataLoader(self.val_set, batch_size=self.options.eval_batch_size, shuffle=False,
                                             num_workers=self.args.dataloader_num_workers if self.args else 0)
        top1, val_loss = classification_scores(loader, lambda images: model(self.normalize(images)), accelerator.device)
        return {"val_loss": val_loss, "top1": top1}

    def save(self, model: nn.Module, output_dir: Path) -> Path:
        if self.info.method == "lora":
            return save_peft(model, output_dir)
        return save_serial_lora(model, output_dir / ADAPTER_FILE, architecture=self.options.model,
                                base_model=self._base_name(), modules_to_save=self.classifier_names)

    def _base_name(self) -> str:
        if self.options.pretrained_file is not None:
            return f"{self.options.model} ({Path(self.options.pretrained_file).name})"
        return self.options.model + ("" if self.options.pretrained else " (random init)")

    def card(self) -> dict[str, Any]:
        shots = f", {self.options.shots} shots per class" if self.options.shots else ""
        skipped = len(self.train_scan.skipped) + (len(self.val_scan.skipped) if self.val_scan else 0)
        train_count = len(self.indices) if self.indices is not None else len(self.train_scan.samples)
        facts: dict[str, Any] = {
            **self.info.card_facts(f"classifier on {self.options.model}", self._base_name()),
            "data": (f"{train_count} training images in {self.num_classes} classes from `{self.options.train_dir}`"
                     f"{shots}; " + (f"validation `{self.options.val_dir}`" if self.options.val_dir
                                     else "no --val-dir, so no validation loss or top-1 was measured")),
            "summary_rows": {"classes": self.num_classes, "skipped bad images": skipped},
        }
        facts["usage"] = self.usage()
        return facts

    def usage(self) -> list[str]:
        """The model card's code block: rebuild the trained classifier on the base this run used (its
        `--pretrained-file` and `--model-kwargs` included, so the snippet reproduces the logits as written)."""
        o = self.options
        base = [f"pretrained={bool(o.pretrained or o.pretrained_file)}"]
        if o.pretrained_file is not None:
            base.append(f"pretrained_cfg_overlay=dict(file={o.pretrained_file!r})")
        base += [f"{key}={value!r}" for key, value in o.model_kwargs.items()]
        note = [] if o.pretrained or o.pretrained_file else ["# trained on a randomly initialised base: outputs "
                                                             "match only on that same base"]
        if self.info.method == "serial":
            return ["```python", "import timm, timm_plugin", *note,
                    f'model = timm.create_model("{o.model}.serial_lora", {", ".join(base)}, '
                    f'serial_lora_weights="{ADAPTER_FILE}")', "```"]
        return peft_usage(["import timm", *note],
                          f'timm.create_model("{o.model}", {", ".join(base)}, num_classes={self.num_classes})', PEFT_DIR)

    def fingerprint(self) -> dict[str, Any]:
        o = self.options
        return {"model": o.model, "pretrained": o.pretrained, "pretrained_file": o.pretrained_file,
                "model_kwargs": o.model_kwargs, "train_dir": str(o.train_dir), "val_dir": o.val_dir, "shots": o.shots,
                "augment": o.augment}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The classifier's options plus the engine's."""
    g = parser.add_argument_group("classifier")
    g.add_argument("--model", required=True, help="timm architecture with the .serial_lora tag, e.g. vit_base_patch16_clip_224")
    g.add_argument("--pretrained", action="store_true", help="load timm's pretrained base weights")
    g.add_argument("--pretrained-file", dest="pretrained_file", help="local base weights (timm's pretrained_cfg_overlay file)")
    g.add_argument("--model-kwargs", dest="model_kwargs", type=_json_dict, default={},
                   help='JSON of extra timm.create_model arguments, e.g. \'{"img_size": 32, "depth": 2}\'')
    g.add_argument("--train-dir", dest="train_dir", required=True, help="image folder, one sub-folder per class")
    g.add_argument("--val-dir", dest="val_dir", help="validation image folder with the same class sub-folders")
    g.add_argument("--shots", type=int, help="train on N images per class, drawn with --seed (few-shot)")
    g.add_argument("--no-augment", dest="augment", action="store_false", help="train with the evaluation transform")
    add_data_arguments(parser, g, eval_batch_size=64, bad="unreadable images", train_batch_size=32)


def _json_dict(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--model-kwargs is not JSON ({err}): {text!r}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--model-kwargs must be a JSON object, got {text!r}")
    return value


main = task_entry(ClassifierTask, ClassifierOptions)


if __name__ == "__main__":
    sys.exit(main(task_parser("serial-lora train-classifier", __doc__, add_arguments).parse_args()))
