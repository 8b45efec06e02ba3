"""`StreamAdapter`: the shared low-rank pair of one attention input stream."""

from __future__ import annotations

import functools
import math
import os
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from .formula import adapted_input, weight_delta

# Below this many input elements the PyTorch path is used: there the forward is bound by the host's
# launch rate (SD3 at batch 2, 1024 px: 8192 x 1536), and a Triton launch costs more host time than
# the two PyTorch kernels it replaces (BENCHMARKS.md).
TRITON_MIN_ELEMENTS = 1 << 24
TRITON_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def load_triton_kernel() -> ModuleType | None:
    """`serial_lora_core.triton_adapter`, imported on first use; None where Triton is not installed.

    Lazy so that CPU-only installs never import Triton.
    """
    try:
        from . import triton_adapter
    except ImportError:
        return None
    return triton_adapter


@functools.cache
def triton_device(device: torch.device) -> bool:
    """Whether the Triton kernel runs on `device`: a CUDA GPU of compute capability 8.0 or newer
    (the kernel's bfloat16 tensor-core dot needs Ampere). The dispatch's only device check."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


class StreamAdapter(nn.Module):
    """x -> x + s·m·up(down(dropout(x))): the (I + s·B·A) that Serial LoRA puts before q, k and v.

    `down` is A (r x d), `up` is B (d x r). `up` starts at zero, so a fresh adapter is the identity.
    `scaling` is s = alpha/r (or alpha/sqrt(r)), fixed by the hyper-parameters (PEFT's `scaling`);
    `scale` is m, the user's strength on top of it (0 = base model, 1 = trained adapter).

    `use_triton` (class-wide, or per instance): at inference on CUDA in float16/bfloat16, compute the
    adapted input with one Triton kernel (`triton_adapter`) where Triton is installed. Off with
    `StreamAdapter.use_triton = False` or the environment variable SERIAL_LORA_TRITON=0.
    """

    use_triton: bool = os.environ.get("SERIAL_LORA_TRITON", "1") != "0"

    def __init__(
        self,
        features: int,
        rank: int,
        scaling: float,
        dropout: float = 0.0,
        init: str = "kaiming",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.down = nn.Linear(features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, features, bias=False, dtype=dtype, device=device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = float(scaling)
        self.scale = 1.0
        self.reset_parameters(init)

    @property
    def rank(self) -> int:
        return self.down.out_features

    @property
    def features(self) -> int:
        return self.down.in_features

    @property
    def factor(self) -> float:
        """s·m: the multiplier of B·A in the forward and in the merged weight."""
        return self.scaling * self.scale

    def reset_parameters(self, init: str = "kaiming") -> None:
        """A as LoRA does (kaiming-uniform, or gaussian with std 1/r); B = 0."""
        if init == "gaussian":
            nn.init.normal_(self.down.weight, std=1.0 / self.rank)
        else:
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def add_to(self, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """base + s·m·B·A·dropout(x).

        Under autocast the result stays in the autocast dtype: the projection that reads it would
        cast its input to that dtype anyway, so no full-precision copy of the adapted input is
        written and read back. Otherwise it runs in the adapter's dtype and returns base's dtype.
        The up-projection, the factor and the addition run as one `addmm` (in place into the cast
        input when nothing needs gradients).
        """
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            return self._add_to(base, x, torch.get_autocast_dtype(device_type))
        return self._add_to(base, x, self.down.weight.dtype).to(base.dtype)

    def _add_to(self, base: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if base is x and self._triton_applies(x, dtype):
            return load_triton_kernel().adapted_input(x, self.down.weight, self.up.weight, self.factor, dtype)
        x_cast = x.to(dtype)
        # The first adapter of a stream casts once. When that cast made a new tensor and nothing needs
        # gradients (inference), the addition goes into it in place: an out-of-place addmm first copies
        # its input into the result, one more pass over the M x d activations.
        # Contiguity is what makes `flat` below a view of the cast input (so the in-place result lands
        # in it); tested instead of comparing data pointers, which tracers (torch.export) cannot read.
        in_place = base is x and x_cast is not x and x_cast.is_contiguous() and not self._needs_grad(x)
        base = x_cast if base is x else base.to(dtype)
        z = F.linear(self.dropout(x_cast), self.down.weight.to(dtype))
        flat = base.reshape(-1, base.shape[-1])
        up = self.up.weight.to(dtype).t()
        if in_place:
            flat.addmm_(z.reshape(-1, z.shape[-1]), up, alpha=self.factor)
            return base
        out = torch.addmm(flat, z.reshape(-1, z.shape[-1]), up, alpha=self.factor)
        return out.view(*base.shape[:-1], out.shape[-1])

    def traceable_add_to(self, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """base + s·m·B·A·dropout(x) in plain tensor operations, for symbolic tracers (torch.fx),
        which cannot answer the dtype and autograd questions `add_to` asks."""
        return adapted_input(self.dropout(x), self.down.weight, self.up.weight, self.factor, base=base)

    def _triton_applies(self, x: torch.Tensor, dtype: torch.dtype) -> bool:
        # Cheapest tests first: this runs for every adapted input. Under torch.compile the PyTorch
        # path is left to the compiler, which fuses it on its own (and never traces the tests below).
        if not self.use_triton or x.numel() < TRITON_MIN_ELEMENTS or dtype not in TRITON_DTYPES:
            return False
        return (
            not torch.compiler.is_compiling()
            and triton_device(x.device)
            and x.is_contiguous()
            and not (self.dropout.training and isinstance(self.dropout, nn.Dropout))
            and not self._needs_grad(x)
            and load_triton_kernel() is not None
        )

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or self.down.weight.requires_grad
                                            or self.up.weight.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_to(x, x)

    def projection_delta(self, weight: torch.Tensor) -> torch.Tensor:
        """The exact change s·m·(W B) A of a projection W (out x d), computed in float32."""
        return weight_delta(weight, self.down.weight, self.up.weight, self.factor)

    def extra_repr(self) -> str:
        return f"features={self.features}, rank={self.rank}, scaling={self.scaling:g}, scale={self.scale:g}"
