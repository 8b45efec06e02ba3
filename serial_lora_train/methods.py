"""`--method serial|lora`, applied the same way to any model the core's hosts recognise.

- serial: `inject_serial_lora` (one shared pair per attention input stream, before q, k, v).
- lora: PEFT's LoRA (`get_peft_model`) on q, k, v and o of the SAME attention modules: the stream's
  projections the host names plus the output projection (`proj` / `out_proj` / `o_proj` / `to_out.0`,
  and `to_add_out` for a joint attention's "text" stream). On timm's fused `qkv` that is `qkv` + `proj`.

Both train with plain AdamW groups or LoRA+ groups (B learns `lora_plus_ratio` x faster, everything else,
e.g. a new head, at the base learning rate): Serial through the core's `loraplus_param_groups`, PEFT's
`lora_B` matrices by the same rule.

`apply_method` returns a `MethodInfo` with the adapter parameter count of what actually ran, next to the
counts both methods have on this model at this rank (Serial: 2·r·d per stream; LoRA: r·(in+out) per
projection), so summaries can state them side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from serial_lora_core import (
    SerialLoraConfig,
    find_attention_modules,
    inject_serial_lora,
    loraplus_param_groups,
    serial_lora_modules,
    serial_lora_parameters,
)

METHODS = ("serial", "lora")
PEFT_DIR = "peft_lora"
"""Folder (PEFT's `save_pretrained`) of a `--method lora` run of the classifier, CLIP and SAM trainers."""
OUTPUT_PROJECTIONS = ("proj", "out_proj", "o_proj", "to_out.0")
"""Output projections of an attention's main stream (timm, HF CLIP/SAM, LLaMA-style, diffusers)."""
STREAM_OUTPUT_PROJECTIONS = {"text": ("to_add_out",)}
"""Streams with their own output projection (diffusers' joint attention writes the text tokens back through it)."""


@dataclass(frozen=True)
class MethodInfo:
    """What `apply_method` did: the method, the adapter parameter count of what ran, and both methods' counts."""

    method: str
    adapter_parameters: int
    serial_parameters: int
    lora_parameters: int
    fused_qkv: bool
    lora_targets: tuple[str, ...]

    @property
    def note(self) -> str:
        """How LoRA's count relates to Serial's here, for the summary table."""
        ratio = self.lora_parameters / self.serial_parameters
        ratio_text = f"{ratio:g}x" if ratio == int(ratio) else f"{ratio:.2f}x"
        why = (": PEFT shares A across q,k,v on a fused qkv+proj" if self.fused_qkv
               else " on split q,k,v,o")
        return f"LoRA {self.lora_parameters:,} = {ratio_text} Serial {self.serial_parameters:,}{why}"

    def card_facts(self, subject: str, base_model: str, lora_targets: str | None = None) -> dict[str, Any]:
        """The model card's method facts: the title ("<method> <subject>"), the method label (LoRA's with
        `lora_targets`, by default what ran: "qkv,proj" on a fused qkv, else "q,k,v,o"), the base model and
        the parameter counts."""
        serial = self.method == "serial"
        lora_targets = lora_targets or ("qkv,proj" if self.fused_qkv else "q,k,v,o")
        return {"title": f"{'Serial LoRA' if serial else 'LoRA (PEFT)'} {subject}",
                "method_label": "Serial LoRA" if serial else f"LoRA (PEFT, {lora_targets})",
                "base_model": base_model, "adapter_parameters": self.adapter_parameters,
                "lora_parameters_note": self.note}


def save_peft(model: nn.Module, output_dir: Path) -> Path:
    """Write a `--method lora` model with PEFT's `save_pretrained` into `output_dir/PEFT_DIR`; return that folder."""
    path = output_dir / PEFT_DIR
    model.save_pretrained(str(path))
    return path


def peft_usage(imports: Sequence[str], base: str, folder: str) -> list[str]:
    """A model card's code block that rebuilds a `--method lora` model: the base expression `base` (after
    `imports`) with PEFT's saved folder `folder` (the trained head, if any, is in it as `modules_to_save`)."""
    return ["```python", *imports, "from peft import PeftModel",
            f"model = PeftModel.from_pretrained({base}, {folder!r})", "```"]


def _output_projections(attention: nn.Module, stream: str) -> list[str]:
    names = STREAM_OUTPUT_PROJECTIONS.get(stream, OUTPUT_PROJECTIONS)
    return [n for n in names if isinstance(_get(attention, n), nn.Linear)]


def _get(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _survey(model: nn.Module, config: SerialLoraConfig) -> tuple[int, list[str], bool]:
    """(Serial count, LoRA target names, fused?) of `model` before any adapter is added. Refuses a rank larger
    than the width of an adapted stream (a low-rank adapter must be low-rank)."""
    found = find_attention_modules(model, config)
    serial, targets, fused = 0, [], False
    for name, (attention, _, streams) in found.items():
        prefix = f"{name}." if name else ""
        for stream, spec in streams.items():
            width = _get(attention, spec.projections[0]).in_features
            if config.rank > width:
                raise ValueError(f"rank {config.rank} is larger than the width {width} of stream {stream!r} of "
                                 f"{name or type(model).__name__!r}; use --rank {width} or less")
            serial += 2 * config.rank * width
            fused = fused or len(spec.projections) == 1
            targets += [prefix + p for p in (*spec.projections, *_output_projections(attention, stream))]
    return serial, targets, fused


def _lora_count(model: nn.Module, targets: Sequence[str], rank: int) -> int:
    return sum(rank * (m.in_features + m.out_features) for m in (model.get_submodule(t) for t in targets))


def _peft_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """PEFT's `target_modules` for `targets`: an `nn.MultiheadAttention` (open_clip) is named itself, since PEFT's
    LoRA for it adapts the packed `in_proj_weight` and `out_proj` together; every other target as it is."""
    names: list[str] = []
    for target in targets:
        parent = target.rpartition(".")[0]
        if isinstance(_get(model, parent) if parent else model, nn.MultiheadAttention):
            target = parent
        if target not in names:
            names.append(target)
    return names


def apply_method(
    model: nn.Module,
    method: str,
    *,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] | None = None,
    streams: Sequence[str] | None = None,
    trainable_modules: Sequence[str] = (),
) -> tuple[nn.Module, MethodInfo]:
    """Add `method`'s adapters to `model` (freezing the rest) and return (model to train, info).

    For "lora" the returned model is a `peft.PeftModel` around `model`. `target_modules`/`streams` select
    the attention modules as in `SerialLoraConfig`, for both methods. `trainable_modules` (e.g. ("head",))
    stay trainable (with PEFT they become `modules_to_save`, so PEFT's own files carry them).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    config = SerialLoraConfig(rank=rank, alpha=alpha, dropout=dropout, target_modules=target_modules, streams=streams)
    serial_count, targets, fused = _survey(model, config)
    lora_count = _lora_count(model, targets, rank)
    if method == "serial":
        inject_serial_lora(model, config, freeze=True)
        for name in trainable_modules:
            model.get_submodule(name).requires_grad_(True)
        ran = sum(p.numel() for p in serial_lora_parameters(model))
    else:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=rank, lora_alpha=config.alpha, lora_dropout=dropout, target_modules=_peft_targets(model, targets),
                          modules_to_save=list(trainable_modules) or None, bias="none")
        model = get_peft_model(model, lora)
        ran = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return model, MethodInfo(method, ran, serial_count, lora_count, fused, tuple(targets))


def is_peft_model(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def parameter_groups(model: nn.Module, learning_rate: float, lora_plus_ratio: float | None,
                     weight_decay: float = 0.0) -> list[dict]:
    """Optimizer groups over the trainable parameters: one group, or LoRA+ groups for either method."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if lora_plus_ratio is None:
        return [{"params": trainable, "lr": learning_rate, "weight_decay": weight_decay}]
    if any(True for _ in serial_lora_modules(model)):
        return loraplus_param_groups(model, learning_rate, lora_plus_ratio, weight_decay)
    if is_peft_model(model):
        # The core's rule for PEFT's names: only B (lora_B) learns faster. PEFT's create_loraplus_optimizer also
        # speeds up every 1-D parameter (a new head's bias), so the two methods' heads would train differently.
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        up = [p for n, p in named if "lora_B" in n]
        rest = [p for n, p in named if "lora_B" not in n]
        return [{"params": rest, "lr": learning_rate, "weight_decay": weight_decay},
                {"params": up, "lr": learning_rate * lora_plus_ratio, "weight_decay": weight_decay}]
    raise ValueError("lora_plus_ratio needs a model with Serial LoRA or PEFT LoRA adapters")


def adapter_parameter_count(model: nn.Module) -> int:
    """Adapter parameters (Serial pairs or PEFT lora_A/lora_B) of `model`, trainable or not."""
    if any(True for _ in serial_lora_modules(model)):
        return sum(p.numel() for p in serial_lora_parameters(model))
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
