"""`SerialLoraConfig`: the hyper-parameters of one Serial LoRA adapter, validated on creation."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

import torch

from .errors import SerialLoraError
from .formula import scaling as scaling_rule

InitMethod = Literal["kaiming", "gaussian"]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_from_name(name: str | torch.dtype | None, argument: str = "dtype") -> torch.dtype | None:
    """Turn 'bfloat16' / torch.bfloat16 / None into a floating torch dtype (or None)."""
    if name is None or isinstance(name, torch.dtype):
        if isinstance(name, torch.dtype) and name not in _DTYPES.values():
            raise TypeError(f"{argument}={name} is not supported; use one of {sorted(_DTYPES)}")
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"{argument}={name!r} is not a floating dtype; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]


FLOAT32_MAX = torch.finfo(torch.float32).max
"""Adapters compute in float32 at least: a factor beyond this overflows at the first forward."""


def check_scale(value: object, argument: str = "scale") -> float:
    """`value` as a float if it is a finite real number within float32's range, else a clear error.

    The one check for every scale/scaling the user or a file gives (`scale`, `--scale`, alpha/r):
    NaN, inf and values like 1e300 are refused up front instead of crashing the first forward.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{argument} must be a real number, got {type(value).__name__} {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        number = math.inf
    if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ValueError(f"{argument}={shown} is not a finite float32 number (|value| <= {FLOAT32_MAX:.3g}); "
                         "pass a finite value such as 1.0")
    return number


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16 (the spelling used in file metadata)."""
    return str(dtype).removeprefix("torch.")


@dataclass
class SerialLoraConfig:
    """What to adapt and how.

    Args:
        rank: rank r of each stream's shared pair (down: r x d, up: d x r).
        alpha: scaling numerator; the adapter is scaled by alpha/r (alpha/sqrt(r) with `use_rslora`).
            Defaults to `rank`, i.e. a scaling of 1.
        dropout: dropout probability on the adapter's input, as in LoRA (training only).
        use_rslora: use the rank-stabilised scaling alpha/sqrt(r).
        init: initialisation of `down` (A): "kaiming" (uniform, as PEFT's LoRA) or "gaussian"
            (normal with std 1/r). `up` (B) always starts at zero, so a new adapter is the identity.
        target_modules: regular expression(s) on module names (`re.search`) selecting the attention
            modules to adapt; None adapts every attention module a host recognises.
        streams: names of the input streams to adapt (e.g. ("image",) for SD3's image tokens
            only); None adapts every stream the host declares.
        dtype: dtype of the adapter weights; None uses the dtype of the attention's projections.
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    use_rslora: bool = False
    init: InitMethod = "kaiming"
    target_modules: str | Sequence[str] | None = None
    streams: Sequence[str] | None = None
    dtype: str | torch.dtype | None = None
    _patterns: tuple[re.Pattern[str], ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int):
            raise TypeError(f"rank must be an int, got {type(self.rank).__name__}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.alpha is None:
            self.alpha = float(self.rank)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise TypeError(f"alpha must be a number, got {type(self.alpha).__name__}")
        if not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be finite, got {self.alpha}")
        self.alpha = float(self.alpha)
        if abs(self.scaling) > FLOAT32_MAX:
            raise ValueError(f"alpha={self.alpha!r} gives a scaling alpha/r of {self.scaling:.3g}, beyond float32 "
                             f"(max {FLOAT32_MAX:.3g}); use a smaller alpha")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {self.dropout!r}")
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got {self.init!r}")
        self.dtype = dtype_from_name(self.dtype)
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)
            try:
                self._patterns = tuple(re.compile(p) for p in self.target_modules)
            except re.error as err:
                raise ValueError(f"target_modules has an invalid regular expression: {err}") from err
        if isinstance(self.streams, str):
            self.streams = (self.streams,)
        if self.streams is not None:
            self.streams = tuple(self.streams)
            if not self.streams:
                raise ValueError("streams must name at least one stream, or be None for all of them")

    @property
    def scaling(self) -> float:
        """The adapter's scaling s: alpha/r, or alpha/sqrt(r) with rsLoRA (as PEFT's `scaling`)."""
        return scaling_rule(self.alpha, self.rank, self.use_rslora)

    def targets(self, module_name: str) -> bool:
        """Whether the attention module called `module_name` is selected by `target_modules`."""
        return not self._patterns or any(p.search(module_name) for p in self._patterns)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict of the public fields."""
        out = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        out["dtype"] = None if self.dtype is None else dtype_name(self.dtype)
        for key in ("target_modules", "streams"):
            out[key] = None if out[key] is None else list(out[key])
        return out
