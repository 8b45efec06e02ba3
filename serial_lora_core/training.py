"""Training helpers: which parameters to optimise, and LoRA+ learning-rate groups."""

from __future__ import annotations

from torch import nn

from .errors import SerialLoraError
from .inject import serial_lora_modules


def serial_lora_parameters(model: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The adapters' parameters (down and up of every stream), optionally of one adapter only."""
    params = []
    for _, module in serial_lora_modules(model):
        for name, adapters in module.items():
            if adapter_name is None or name == adapter_name:
                params.extend(adapters.parameters())
    return params


def count_trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    ratio: float = 20.0,
    weight_decay: float = 0.0,
    adapter_name: str | None = None,
) -> list[dict]:
    """Optimizer groups for LoRA+ (Hayou et al. 2024): every B (`up`) learns `ratio` x faster than A.

    Trainable parameters that are not adapters (e.g. a new classifier head) get `lr`.
    Pass the result to any torch optimizer: `torch.optim.AdamW(loraplus_param_groups(model, 2e-4))`.
    """
    if lr <= 0 or ratio <= 0:
        raise SerialLoraError(f"lr and ratio must be positive, got lr={lr}, ratio={ratio}")
    down, up = [], []
    for _, module in serial_lora_modules(model):
        for name, adapters in module.items():
            if adapter_name is None or name == adapter_name:
                for adapter in adapters.values():
                    down.extend(p for p in adapter.down.parameters() if p.requires_grad)
                    up.extend(p for p in adapter.up.parameters() if p.requires_grad)
    if not down:
        raise SerialLoraError("no trainable Serial LoRA parameters; call inject_serial_lora() first")
    seen = {id(p) for p in down + up}
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    groups = [
        {"params": down, "lr": lr, "weight_decay": weight_decay, "name": "serial_lora_down"},
        {"params": up, "lr": lr * ratio, "weight_decay": weight_decay, "name": "serial_lora_up"},
    ]
    if other:
        groups.append({"params": other, "lr": lr, "weight_decay": weight_decay, "name": "other"})
    return groups
