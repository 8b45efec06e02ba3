"""Turn a freshly built timm model into a Serial LoRA model (what the `.serial_lora` entry points do)."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Sequence

from torch import nn

from serial_lora_core import (
    ARCHITECTURE_ATTRIBUTE,
    AdapterFile,
    SerialLoraConfig,
    SerialLoraError,
    inject_serial_lora,
    load_serial_lora,
    read_file,
)

from .hosts import unsupported_attention

PREFIX = "serial_lora_"


@dataclass(frozen=True)
class SerialLoraOptions:
    """The `serial_lora_*` keyword arguments of `timm.create_model("<arch>.serial_lora", ...)`.

    Args:
        rank: rank r of each block's shared pair (default 8).
        alpha: scaling numerator, scaling = alpha/rank (default: rank, i.e. scaling 1).
        dropout: dropout on the adapter's input while training (default 0).
        rslora: scaling alpha/sqrt(r) instead of alpha/r (default False).
        weights: path of a trained Serial LoRA file to load; its rank, alpha, dropout and rslora
            are used, and any of the four above given explicitly must agree with it.
        target_modules: regular expression(s) on attention module names (e.g. r"blocks\\.(8|9|10|11)\\.")
            selecting which blocks to adapt (default: all).
    """

    rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    rslora: bool | None = None
    weights: str | os.PathLike | None = None
    target_modules: str | Sequence[str] | None = None

    @classmethod
    def pop_from(cls, kwargs: dict[str, Any]) -> "SerialLoraOptions":
        """Remove the `serial_lora_*` entries from `kwargs` (the rest go to timm) and validate them."""
        known = {PREFIX + f.name for f in fields(cls)}
        unknown = sorted(k for k in kwargs if k.startswith(PREFIX) and k not in known)
        if unknown:
            raise TypeError(f"unknown Serial LoRA argument(s) {unknown}; accepted: {sorted(known)}")
        options = cls(**{f.name: kwargs.pop(PREFIX + f.name) for f in fields(cls) if PREFIX + f.name in kwargs})
        if options.rslora is not None and not isinstance(options.rslora, bool):
            raise TypeError(f"serial_lora_rslora must be True or False, got {options.rslora!r}")
        if options.weights is not None and not isinstance(options.weights, (str, os.PathLike)):
            raise TypeError(f"serial_lora_weights must be a path, got {type(options.weights).__name__}")
        if options.weights is not None and options.target_modules is not None:
            raise ValueError("serial_lora_target_modules cannot be combined with serial_lora_weights: the file "
                             "decides which attention modules are adapted; drop serial_lora_target_modules")
        return options

    def config(self) -> SerialLoraConfig:
        """The core config for a new adapter (validates rank, alpha, dropout)."""
        return SerialLoraConfig(
            rank=8 if self.rank is None else self.rank,
            alpha=self.alpha,
            dropout=0.0 if self.dropout is None else self.dropout,
            use_rslora=bool(self.rslora),
            target_modules=self.target_modules,
        )

    def check_against_file(self, adapter: AdapterFile) -> None:
        """Refuse explicit hyper-parameters that contradict the adapter file's metadata."""
        stored = {
            "rank": adapter.rank,
            "alpha": adapter.alpha,
            "dropout": adapter.dropout,
            "rslora": adapter.use_rslora,
        }
        for name, value in stored.items():
            given = getattr(self, name)
            if given is not None and not (given == value or (isinstance(value, float) and math.isclose(given, value))):
                raise ValueError(f"{PREFIX}{name}={given!r} contradicts {adapter.path}, which was trained with "
                                 f"{name}={value!r}; leave {PREFIX}{name} out when passing {PREFIX}weights")


def warn_if_base_not_loaded(architecture: str, pretrained: bool, options: SerialLoraOptions) -> None:
    """Warn (UserWarning) when a trained adapter is put on base weights that were never loaded.

    An adapter only means something on the weights it was trained with; `pretrained=False` leaves the
    base random (timm loads a `pretrained_cfg_overlay` file only with `pretrained=True`), which is almost
    always a mistake. Called by the `.serial_lora` entry points before the model is built.
    """
    if options.weights is not None and not pretrained:
        warnings.warn(
            f"serial_lora_weights={str(options.weights)!r} is loaded onto '{architecture}' built with "
            "pretrained=False, so on random base weights: its outputs mean nothing. Pass pretrained=True (with "
            "pretrained_cfg_overlay=dict(file=...) for local base weights), or load the base weights afterwards.",
            UserWarning, stacklevel=4)  # this function, the entry point, timm.create_model, the caller


def make_serial_lora(model: nn.Module, architecture: str, options: SerialLoraOptions) -> nn.Module:
    """Add Serial LoRA to a timm model built by `architecture`'s entry point; freeze everything else.

    The classifier head stays trainable when `num_classes` differs from the pretrained config's
    (it is new). With `options.weights` the trained adapter is loaded (trainable, for further training).
    """
    problems = unsupported_attention(model)
    if problems:
        raise SerialLoraError(f"Serial LoRA cannot adapt every block of {architecture!r}: "
                              f"{'; '.join(problems[:3])}. Use another architecture.")
    setattr(model, ARCHITECTURE_ATTRIBUTE, architecture)
    if options.weights is None:
        inject_serial_lora(model, options.config(), freeze=True)
    else:
        adapter = read_file(options.weights)  # read once for both checks; load_serial_lora reads it itself
        options.check_against_file(adapter)
        _fit_classifier_to_file(model, adapter)
        model.requires_grad_(False)
        load_serial_lora(model, options.weights, architecture=architecture, trainable=True)
    _unfreeze_new_classifier(model)
    return model


def classifier_names(model: nn.Module | Mapping[str, Any] | None) -> tuple[str, ...]:
    """The classifier head module name(s) timm records for `model`, or in a pretrained cfg given as a mapping (a
    distilled DeiT has two)."""
    cfg = model if model is None or isinstance(model, Mapping) else getattr(model, "pretrained_cfg", None)
    names = (cfg or {}).get("classifier") or "head"
    return tuple(names) if isinstance(names, (tuple, list)) else (names,)


def _fit_classifier_to_file(model: nn.Module, adapter: AdapterFile) -> None:
    """Give the model the class count of the trained head the file carries (format v2 `modules_to_save`).

    The file is read before anything is loaded, so the trained head's tensors fit: a model built with the
    pretrained head (num_classes left out) gets a head of the file's size. An explicit num_classes that
    differs from the file's is refused.
    """
    weight = adapter.modules_to_save.get(f"{classifier_names(model)[0]}.weight")
    if weight is None or not hasattr(model, "reset_classifier"):
        return
    file_classes = int(weight.shape[0])
    classes = getattr(model, "num_classes", None)
    if classes == file_classes:
        return
    if classes != (getattr(model, "pretrained_cfg", None) or {}).get("num_classes"):
        raise ValueError(f"num_classes={classes} contradicts {adapter.path}, whose trained classifier has {file_classes} "
                         "classes; leave num_classes out to rebuild the trained classifier")
    model.reset_classifier(file_classes)


def _unfreeze_new_classifier(model: nn.Module) -> None:
    pretrained_classes = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
    classes = getattr(model, "num_classes", pretrained_classes)
    if pretrained_classes is None or classes == pretrained_classes or not hasattr(model, "get_classifier"):
        return
    heads = model.get_classifier()
    # DeiT distilled models return (head, head_dist).
    for head in heads if isinstance(heads, (tuple, list)) else (heads,):
        if isinstance(head, nn.Module):
            head.requires_grad_(True)
