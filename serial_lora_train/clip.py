"""`serial-lora train-clip`: CLIP few-shot classification with the class names as prompts (the paper's Table III).

    serial-lora train-clip --model openai/clip-vit-base-patch16 --train-dir data/train --val-dir data/test \\
        --shots 16 --seed 0 --output-dir out            # paper defaults: rank 32, lr 2e-4, dropout 0.25, bf16 on GPU

Each class name (its folder name, "_" read as a space) becomes a prompt, "a photo of a {}." by default. Every step
encodes the prompts through the ADAPTED text tower and the images through the ADAPTED vision tower; the logits are
the cosine similarities times the model's own logit scale (CLIP's `logits_per_image`), and the loss is
cross-entropy. Serial LoRA adapts every attention of both towers (one pair per layer per tower, `--towers` to
choose); `--method lora` trains PEFT's LoRA on q, k, v and o of the same layers (on open_clip, PEFT's LoRA for
`nn.MultiheadAttention`: its packed q/k/v projection and out_proj). The held-out split (`--val-dir`,
or with `--shots` the training images not drawn) is scored zero-shot before training and few-shot after; both
are in the summary, `metrics.jsonl` and the model card.

`--model` is a Hugging Face hub id or local folder (`CLIPModel.from_pretrained`, with its tokenizer and image
processor), or `open_clip:<model name>` (`open_clip.create_model_and_transforms`, with `--open-clip-pretrained`
naming open_clip's pretrained tag or a local checkpoint file). The adapter file records the towers, the class
names and the prompt template; reload it with `transformers_plugin.load_serial_lora(model, file)`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import few_shot_indices, image_folder_dataset, scan_train_val
from .engine import Task, TaskSetup, TrainingArguments, classification_scores
from .entry import add_data_arguments, task_entry, task_parser
from .methods import PEFT_DIR, MethodInfo, apply_method, peft_usage, save_peft

ADAPTER_FILE = "serial_lora.safetensors"
OPEN_CLIP_PREFIX = "open_clip:"
DEFAULT_TEMPLATE = "a photo of a {}."
TOWERS = ("vision", "text")


@dataclass
class ClipOptions:
    """What the CLIP task needs beyond `TrainingArguments`."""

    model: str
    train_dir: str
    val_dir: str | None = None
    shots: int | None = None
    template: str = DEFAULT_TEMPLATE
    towers: tuple[str, ...] = TOWERS
    open_clip_pretrained: str | None = None
    skip_bad_images: bool = False
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.template.count("{}") != 1:
            raise ValueError(f"--template {self.template!r} must contain exactly one '{{}}' for the class name, "
                             f"e.g. {DEFAULT_TEMPLATE!r}")
        unknown = [t for t in self.towers if t not in TOWERS]
        if unknown or not self.towers:
            raise ValueError(f"--towers {','.join(self.towers)!r}: choose from {','.join(TOWERS)}")


def class_prompts(classes: list[str], template: str) -> list[str]:
    """One prompt per class folder name ("golden_retriever" -> "a photo of a golden retriever.")."""
    return [template.format(name.replace("_", " ")) for name in classes]


class _HFTransform:
    """PIL image -> the model's pixel_values (the CLIP image processor's own resize, crop and normalisation)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Any) -> torch.Tensor:
        return self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]


@dataclass
class LoadedClip:
    """A CLIP model of either library, with its tokenizer and image transform."""

    model: nn.Module
    tokenize: Callable[[list[str]], dict[str, torch.Tensor]]
    transform: Callable[[Any], torch.Tensor]
    library: str  # "transformers" or "open_clip"


def load_clip(model: str, open_clip_pretrained: str | None = None) -> LoadedClip:
    """The base model named by `--model` (a hub id / folder, or open_clip:<name>), in eval mode."""
    if model.startswith(OPEN_CLIP_PREFIX):
        import open_clip

        name = model[len(OPEN_CLIP_PREFIX):]
        if name not in open_clip.list_models():
            raise ValueError(f"--model {model!r}: open_clip has no model {name!r}; see open_clip.list_models(), "
                             "e.g. open_clip:ViT-B-16")
        net, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=open_clip_pretrained)
        tokenizer = open_clip.get_tokenizer(name)
        return LoadedClip(net.eval(), lambda texts: {"input_ids": tokenizer(texts)}, preprocess, "open_clip")
    if open_clip_pretrained is not None:
        raise ValueError("--open-clip-pretrained applies only to --model open_clip:<name>")
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    try:
        net = CLIPModel.from_pretrained(model)
        tokenizer = AutoTokenizer.from_pretrained(model)
        processor = CLIPImageProcessor.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise ValueError(f"--model {model!r}: cannot load a CLIP model, tokenizer and image processor from it "
                         f"({str(err).splitlines()[0]}); pass a hub id or a folder written by save_pretrained") from err

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    return LoadedClip(net.eval(), tokenize, _HFTransform(processor), "transformers")


def clip_logits(model: nn.Module, pixel_values: torch.Tensor, prompts: dict[str, torch.Tensor], library: str) -> torch.Tensor:
    """(images x classes) logits: cosine similarity of image and prompt embeddings times the model's logit scale."""
    if library == "open_clip":
        image, text, logit_scale = model(pixel_values, prompts["input_ids"])[:3]  # features already normalised
        return logit_scale * image @ text.T
    return model(pixel_values=pixel_values, **prompts).logits_per_image


class ClipTask(Task):
    """CLIP prompt classification: cross-entropy of `clip_logits` against the image's class."""

    name = "clip"

    def __init__(self, options: ClipOptions) -> None:
        self.options = options
        # Checked here, before any model is loaded.
        self.train_scan, self.val_scan = scan_train_val(options.train_dir, options.val_dir, shots=options.shots,
                                                        skip_bad_images=options.skip_bad_images)
        self.prompts = class_prompts(self.train_scan.classes, options.template)
        self.library = "open_clip" if options.model.startswith(OPEN_CLIP_PREFIX) else "transformers"
        self.info: MethodInfo | None = None
        self.tokens: dict[str, torch.Tensor] = {}
        self.val_set: Any = None
        self.indices: list[int] | None = None
        self.zero_shot: dict[str, float] = {}

    def build(self, args: TrainingArguments, accelerator: Any) -> TaskSetup:
        import transformers_plugin as tp

        loaded = load_clip(self.options.model, self.options.open_clip_pretrained)
        model = loaded.model
        tp.prepare(model)
        towers = tp.attention_towers(model)
        missing = [t for t in self.options.towers if t not in towers]
        if missing:
            raise ValueError(f"--towers: {self.options.model!r} has no {missing[0]!r} tower with attention "
                             f"(it has {sorted(towers)})")
        targets = [f"^{re.escape(name)}$" for t in self.options.towers for name in towers[t]]
        model, self.info = apply_method(model, args.method, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                                        target_modules=targets)
        self.tokens = loaded.tokenize(self.prompts)
        dataset = image_folder_dataset(self.train_scan, loaded.transform)
        held_out = None
        if self.options.shots is not None:
            self.indices = few_shot_indices(self.train_scan.targets, self.options.shots, args.seed, self.train_scan.classes)
            rest = sorted(set(range(len(dataset))) - set(self.indices))
            held_out = torch.utils.data.Subset(dataset, rest) if rest else None
            dataset = torch.utils.data.Subset(dataset, self.indices)
        self.val_set = image_folder_dataset(self.val_scan, loaded.transform) if self.val_scan is not None else held_out
        if self.val_set is not None:  # zero-shot: the adapters start as the identity, so this is the base model
            model.to(accelerator.device)
            model.eval()
            with torch.no_grad(), accelerator.autocast():
                scores = self.score(model, accelerator.device)
            self.zero_shot = {f"zero_shot_{k}": v for k, v in scores.items()}
            model.train()
        return TaskSetup(model=model, train_dataset=dataset)

    def _prompts_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in self.tokens.items()}

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(clip_logits(model, images, self._prompts_on(images.device), self.library).float(), labels)

    def score(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """top-1 accuracy and mean cross-entropy of the prompt classifier on the held-out split."""
        loader = torch.utils.data.DataLoader(self.val_set, batch_size=self.options.eval_batch_size, shuffle=False)
        prompts = self._prompts_on(device)
        top1, val_loss = classification_scores(loader, lambda images: clip_logits(model, images, prompts, self.library),
                                               device)
        return {"top1": top1, "val_loss": val_loss}

    def evaluate(self, model: nn.Module, accelerator: Any) -> dict[str, float]:
        """top1 / val_loss of the adapted model, next to zero_shot_top1 / zero_shot_val_loss (before training)."""
        if self.val_set is None:
            return {}
        return {**self.score(model, accelerator.device), **self.zero_shot}

    def save(self, model: nn.Module, output_dir: Path) -> Path:
        if self.info.method == "lora":
            return save_peft(model, output_dir)
        import transformers_plugin as tp

        metadata = {"class_names": json.dumps(self.train_scan.classes), "prompt_template": self.options.template}
        return tp.save_serial_lora(model, output_dir / ADAPTER_FILE, base_model=self.options.model, metadata=metadata)

    def card(self) -> dict[str, Any]:
        o = self.options
        count = len(self.indices) if self.indices is not None else len(self.train_scan.samples)
        shots = f", {o.shots} shots per class (seeded)" if o.shots else ""
        # Say plainly when nothing was held out (no --val-dir, every image drawn): then no accuracy was measured.
        held = len(self.val_set) if self.val_set is not None else 0
        where = f"`{o.val_dir}`" if o.val_dir else "the training images not drawn as shots"
        held_out = (f"{held} images, {where}" if held else
                    "none, so no zero-/few-shot accuracy (pass --val-dir, or --shots below the class sizes)")
        facts: dict[str, Any] = {
            **self.info.card_facts(f"CLIP classifier on {o.model}", o.model),
            "data": f"{count} training images in {len(self.prompts)} classes from `{o.train_dir}`{shots}; prompts "
                    f"{o.template!r}; held-out: {held_out}",
            "summary_rows": {"towers": ",".join(o.towers), "classes": len(self.prompts),
                             "held-out images": held or "none (pass --val-dir)"},
        }
        if self.info.method == "serial":
            facts["usage"] = ["```python", "import transformers_plugin as tp", *self._load_lines(), "```"]
        elif self.library == "transformers":
            facts["usage"] = peft_usage(["from transformers import CLIPModel"], f"CLIPModel.from_pretrained({o.model!r})",
                                        PEFT_DIR)
        else:
            facts["usage"] = peft_usage(["import open_clip"], self._open_clip_base(), PEFT_DIR)
        return facts

    def _open_clip_base(self) -> str:
        """The expression that builds the open_clip base model."""
        name = self.options.model[len(OPEN_CLIP_PREFIX):]
        return f"open_clip.create_model({name!r}, pretrained={self.options.open_clip_pretrained!r})"

    def _load_lines(self) -> list[str]:
        """The card's lines that rebuild the trained model (runnable as written from the card's folder)."""
        o = self.options
        if self.library == "transformers":
            return [f"model = tp.from_pretrained({o.model!r}, {ADAPTER_FILE!r})"]
        return ["import open_clip", f"model = {self._open_clip_base()}", f"tp.load_serial_lora(model, {ADAPTER_FILE!r})"]

    def fingerprint(self) -> dict[str, Any]:
        o = self.options
        return {"model": o.model, "train_dir": str(o.train_dir), "val_dir": o.val_dir, "shots": o.shots,
                "template": o.template, "towers": list(o.towers), "open_clip_pretrained": o.open_clip_pretrained}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The CLIP task's options plus the engine's (paper defaults: rank 32, lr 2e-4, dropout 0.25)."""
    g = parser.add_argument_group("clip")
    g.add_argument("--model", required=True,
                   help="hub id or local folder of a transformers CLIP model, or open_clip:<name> (e.g. open_clip:ViT-B-16)")
    g.add_argument("--open-clip-pretrained", dest="open_clip_pretrained",
                   help="open_clip pretrained tag or local checkpoint file (only with --model open_clip:<name>)")
    g.add_argument("--train-dir", dest="train_dir", required=True, help="image folder, one sub-folder per class")
    g.add_argument("--val-dir", dest="val_dir", help="held-out image folder with the same class sub-folders")
    g.add_argument("--shots", type=int, help="train on N images per class drawn with --seed; the rest is held out")
    g.add_argument("--template", default=DEFAULT_TEMPLATE, help=f"prompt template (default {DEFAULT_TEMPLATE!r})")
    g.add_argument("--towers", type=lambda s: tuple(t.strip() for t in s.split(",") if t.strip()), default=TOWERS,
                   help="towers to adapt, comma-separated (default: vision,text)")
    add_data_arguments(parser, g, eval_batch_size=64, bad="unreadable images", train_batch_size=32)


main = task_entry(ClipTask, ClipOptions)


if __name__ == "__main__":
    sys.exit(main(task_parser("serial-lora train-clip", __doc__, add_arguments).parse_args()))
