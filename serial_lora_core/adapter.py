"""`StreamAdapter`: the shared low-rank pair of one attention input stream."""

from __future__ import annotations

import math

import torch
from torch import nn


class StreamAdapter(nn.Module):
    """x -> x + s * up(down(dropout(x))): the (I + s·B·A) that Serial LoRA puts before q, k and v.

    `down` is A (r x d), `up` is B (d x r). `up` starts at zero, so a fresh adapter is the identity.
    `scale` is s = alpha/r (or alpha/sqrt(r)); `weight` is the user's strength on top of it.
    """

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

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """s·weight·B·A·dropout(x), in x's dtype (the adapter may be kept in another dtype)."""
        h = self.dropout(x)
        if h.dtype != self.down.weight.dtype and not torch.is_autocast_enabled(h.device.type):
            h = h.to(self.down.weight.dtype)
        out = self.up(self.down(h)) * (self.scale * self.weight)
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.delta(x)

    def projection_delta(self, weight: torch.Tensor) -> torch.Tensor:
        """The exact change s·weight·(W B) A of a projection W (out x d), computed in float32."""
        w = weight.detach().float()
        up = self.up.weight.detach().float().to(w.device)
        down = self.down.weight.detach().float().to(w.device)
        return (self.scale * self.weight) * ((w @ up) @ down)

    def extra_repr(self) -> str:
        return f"features={self.features}, rank={self.rank}, scale={self.scale:g}, weight={self.weight:g}"
