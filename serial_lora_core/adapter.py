"""`StreamAdapter`: the shared low-rank pair of one attention input stream."""

from __future__ import annotations

import functools
import math
import os
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn


_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Below this many input elements the PyTorch path is used: there the forward is bound by the host's
# launch rate (SD3 at batch 2, 1024 px: 8192 x 1536), and a Triton launch costs more host time than
# the two PyTorch kernels it replaces (BENCHMARKS.md).
TRITON_MIN_ELEMENTS = 1 << 24
_triton_adapter = None  # serial_lora_core.triton_adapter once imported, False where Triton is missing


def _triton_kernel() -> ModuleType | bool:
    """The Triton kernel module, imported on first use (False without Triton)."""
    global _triton_adapter
    if _triton_adapter is None:
        try:
            from . import triton_adapter
        except ImportError:
            triton_adapter = False
        _triton_adapter = triton_adapter
    return _triton_adapter


@functools.cache
def _triton_capable(device: torch.device) -> bool:
    """Ampere or newer: the kernel's bfloat16 tensor-core dot needs compute capability 8.0."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


class StreamAdapter(nn.Module):
    """x -> x + s * up(down(dropout(x))): the (I + s·B·A) that Serial LoRA puts before q, k and v.

    `down` is A (r x d), `up` is B (d x r). `up` starts at zero, so a fresh adapter is the identity.
    `scale` is s = alpha/r (or alpha/sqrt(r)); `weight` is the user's strength on top of it.

    `use_triton` (class-wide, or per instance): at inference on CUDA in float16/bfloat16, compute the
    adapted input with one Triton kernel (`triton_adapter`) where Triton is installed. Off with
    `StreamAdapter.use_triton = False` or the environment variable SERIAL_LORA_TRITON=0.
    """

    use_triton: bool = os.environ.get("SERIAL_LORA_TRITON", "1") != "0"

    def __init__(
        self,
        features: int,
        rank: int,
        scale: float,
        dropout: float = 0.0,
        init: str = "kaiming",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.down = nn.Linear(features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, features, bias=False, dtype=dtype, device=device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = float(scale)
        self.weight = 1.0
        self.reset_parameters(init)

    @property
    def rank(self) -> int:
        return self.down.out_features

    @property
    def features(self) -> int:
        return self.down.in_features

    def reset_parameters(self, init: str = "kaiming") -> None:
        """A as LoRA does (kaiming-uniform, or gaussian with std 1/r); B = 0."""
        if init == "gaussian":
            nn.init.normal_(self.down.weight, std=1.0 / self.rank)
        else:
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def add_to(self, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """base + s·weight·B·A·dropout(x).

        Under autocast the result stays in the autocast dtype: the projection that reads it would
        cast its input to that dtype anyway, so no full-precision copy of the adapted input is
        written and read back. Otherwise it runs in the adapter's dtype and returns base's dtype.
        The up-projection, the scale and the addition run as one `addmm` (in place into the cast
        input when nothing needs gradients).
        """
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            return self._add_to(base, x, torch.get_autocast_dtype(device_type))
        return self._add_to(base, x, self.down.weight.dtype).to(base.dtype)

    def _add_to(self, base: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if base is x and self._triton_applies(x, dtype):
            return _triton_adapter.adapted_input(x, self.down.weight, self.up.weight, self.scale * self.weight, dtype)
        x_cast = x.to(dtype)
        # The first adapter of a stream casts once. When that cast made a new tensor and nothing needs
        # gradients (inference), the addition goes into it in place: an out-of-place addmm first copies
        # its input into the result, one more pass over the M x d activations.
        in_place = base is x and x_cast is not x and not self._needs_grad(x)
        base = x_cast if base is x else base.to(dtype)
        z = F.linear(self.dropout(x_cast), self.down.weight.to(dtype))
        flat = base.reshape(-1, base.shape[-1])
        up = self.up.weight.to(dtype).t()
        if in_place and flat.data_ptr() == base.data_ptr():
            flat.addmm_(z.reshape(-1, z.shape[-1]), up, alpha=self.scale * self.weight)
            return base
        out = torch.addmm(flat, z.reshape(-1, z.shape[-1]), up, alpha=self.scale * self.weight)
        return out.view(*base.shape[:-1], out.shape[-1])

    def _triton_applies(self, x: torch.Tensor, dtype: torch.dtype) -> bool:
        # Under torch.compile the PyTorch path is left to the compiler, which fuses it on its own.
        if not (x.is_cuda or _TRITON_INTERPRET) or not self.use_triton or torch.compiler.is_compiling():
            return False
        if x.numel() < TRITON_MIN_ELEMENTS:
            return False
        if x.is_cuda:
            if not _triton_capable(x.device):
                return False
        elif dtype is not torch.float16:  # Triton's CPU interpreter (tests) gets bfloat16 dots wrong
            return False
        return (
            dtype in (torch.float16, torch.bfloat16)
            and x.is_contiguous()
            and not (self.dropout.training and isinstance(self.dropout, nn.Dropout))
            and not self._needs_grad(x)
            and bool(_triton_kernel())
        )

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or self.down.weight.requires_grad
                                            or self.up.weight.requires_grad)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """s·weight·B·A·dropout(x) alone (for inspection; the forward path uses `add_to`)."""
        return self.add_to(torch.zeros_like(x), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_to(x, x)

    def projection_delta(self, weight: torch.Tensor) -> torch.Tensor:
        """The exact change s·weight·(W B) A of a projection W (out x d), computed in float32."""
        w = weight.detach().float()
        up = self.up.weight.detach().float().to(w.device)
        down = self.down.weight.detach().float().to(w.device)
        return (self.scale * self.weight) * ((w @ up) @ down)

    def extra_repr(self) -> str:
        return f"features={self.features}, rank={self.rank}, scale={self.scale:g}, weight={self.weight:g}"
