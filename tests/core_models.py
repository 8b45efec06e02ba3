"""Tiny models built in code (no timm/diffusers) and shared helpers for the core's tests.

Four attention layouts, one per way the core can meet attention in the wild:
- `FusedQKVAttention`: timm-like, one `qkv` Linear and a `proj` output projection.
- `SplitQKVAttention`: `q_proj/k_proj/v_proj` + `o_proj`, plus a gate and a residual that also
  read x (they must keep seeing the original x).
- `JointAttention`: diffusers naming, image stream `to_q/to_k/to_v`, text stream
  `add_q_proj/add_k_proj/add_v_proj` (of another width), outputs `to_out[0]` / `to_add_out`.
- `FunctionalQKVAttention`: calls `F.linear(x, self.qkv.weight, ...)`, so it needs a host
  described with `StreamSpec(input_argument=("x", 0))` (see `FUNCTIONAL_HOST`).

Every model takes tokens of any leading shape, (B, N, C) or (B, H, W, C), and returns one tensor.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from safetensors import safe_open

from serial_lora_core import (
    ARCHITECTURE_ATTRIBUTE,
    AttentionHost,
    SerialLoraConfig,
    StreamSpec,
    inject_serial_lora,
    serial_lora_modules,
)
from serial_lora_core.format import write_file
from serial_lora_core.hosts import registered

DIM = 16
TEXT_DIM = 12
HEADS = 2
DEPTH = 2
OUT = 5


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Plain multi-head softmax attention over tokens (B, N, C) -> (B, N, C), in the inputs' dtype."""
    batch, tokens, width = q.shape
    split = lambda t: t.reshape(batch, t.shape[1], heads, width // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(width // heads), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(batch, -1, width)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1, x.shape[-1])


class FusedQKVAttention(nn.Module):
    """timm `Attention` in miniature: one fused qkv Linear, heads, an output projection."""

    def __init__(self, dim: int = DIM, heads: int = HEADS) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = _tokens(self.qkv(x)).chunk(3, dim=-1)
        return self.proj(attend(q, k, v, self.heads).reshape(x.shape))


class SplitQKVAttention(nn.Module):
    """Split q/k/v with an output projection, and a gate and a residual that read x too."""

    def __init__(self, dim: int = DIM, heads: int = HEADS) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim)
        self.gate = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_tokens(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))
        attn = attend(q, k, v, self.heads).reshape(x.shape)
        return self.o_proj(attn) + self.gate(x) + x


class JointAttention(nn.Module):
    """SD3-style joint attention with diffusers' names: image and text streams attend together."""

    def __init__(self, dim: int = DIM, text_dim: int = TEXT_DIM, heads: int = HEADS, cross: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.is_cross_attention = cross
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(text_dim, dim) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.to_add_out = nn.Linear(dim, text_dim)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = [_tokens(p(hidden_states)) for p in (self.to_q, self.to_k, self.to_v)]
        text = [_tokens(p(encoder_hidden_states)) for p in (self.add_q_proj, self.add_k_proj, self.add_v_proj)]
        q, k, v = (torch.cat(pair, dim=1) for pair in zip(image, text))
        out = attend(q, k, v, self.heads)
        n = image[0].shape[1]
        # Contiguous copies: BLAS results on a view can depend on its memory alignment, and the
        # zero-init test compares two runs bit for bit.
        image_out = self.to_out[1](self.to_out[0](out[:, :n].reshape(*hidden_states.shape[:-1], -1).contiguous()))
        return image_out, self.to_add_out(out[:, n:].contiguous())


class FunctionalQKVAttention(FusedQKVAttention):
    """Reads its qkv weight with F.linear instead of calling the layer: only an argument hook sees x."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = _tokens(F.linear(x, self.qkv.weight, self.qkv.bias)).chunk(3, dim=-1)
        return self.proj(attend(q, k, v, self.heads).reshape(x.shape))


FUNCTIONAL_HOST = AttentionHost(
    name="functional_qkv",
    class_names=("FunctionalQKVAttention",),
    streams={"input": StreamSpec(projections=("qkv",), input_argument=("x", 0))},
)


class Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, attention: nn.Module, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attention
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Transformer blocks over tokens of any leading shape, then a per-token head."""

    def __init__(self, attention: type[nn.Module], dim: int = DIM, depth: int = DEPTH) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(attention(dim), dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class JointBlock(nn.Module):
    def __init__(self, dim: int, text_dim: int) -> None:
        super().__init__()
        self.norm_image = nn.LayerNorm(dim)
        self.norm_text = nn.LayerNorm(text_dim)
        self.attn = JointAttention(dim, text_dim)
        self.mlp = Mlp(dim)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.attn(self.norm_image(image), encoder_hidden_states=self.norm_text(text))
        image = image + a
        return image + self.mlp(image), text + b


class JointModel(nn.Module):
    """Two-stream (image, text) transformer; the output is both streams flattened and concatenated."""

    def __init__(self, dim: int = DIM, depth: int = DEPTH, text_dim: int = TEXT_DIM, cross_attention: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([JointBlock(dim, text_dim) for _ in range(depth)])
        # Cross-attention must never be adapted (k and v read the other stream).
        self.cross = JointAttention(dim, text_dim, cross=True) if cross_attention else None
        self.head = nn.Linear(dim, OUT)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            image, text = block(image, text)
        if self.cross is not None:
            image = image + self.cross(image, text)[0]
        return torch.cat([self.head(image).flatten(1), text.flatten(1)], dim=1)


class NoAttention(nn.Module):
    """An MLP: nothing for Serial LoRA to adapt."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.mlp = Mlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


# ---------------------------------------------------------------------------------- host table
@dataclass(frozen=True)
class HostCase:
    """One host layout: how to build its model, its inputs, and what the core should find."""

    name: str
    build: Callable[..., nn.Module]
    # stream -> (projection names, input width d)
    streams: dict[str, tuple[tuple[str, ...], int]]
    output_projections: tuple[str, ...]
    # attention forward argument name -> stream it carries
    arguments: tuple[str, ...]
    needs_functional_host: bool = False

    def model(self, dtype: torch.dtype = torch.float32, seed: int = 0, **kwargs) -> nn.Module:
        torch.manual_seed(seed)
        return self.build(**kwargs).to(dtype).eval()

    def inputs(self, shape: str = "BNC", dtype: torch.dtype = torch.float32, seed: int = 1, dim: int = DIM) -> tuple:
        generator = torch.Generator().manual_seed(seed)
        lead = (2, 5) if shape == "BNC" else (2, 2, 3)
        image = torch.randn(*lead, dim, generator=generator).to(dtype)
        if self.name == "joint":
            return image, torch.randn(2, 3, TEXT_DIM, generator=generator).to(dtype)
        return (image,)


HOSTS = {
    "fused": HostCase("fused", lambda **kw: TinyViT(FusedQKVAttention, **kw), {"input": (("qkv",), DIM)},
                      ("proj",), ("x",)),
    "split": HostCase("split", lambda **kw: TinyViT(SplitQKVAttention, **kw),
                      {"input": (("q_proj", "k_proj", "v_proj"), DIM)}, ("o_proj", "gate"), ("x",)),
    "joint": HostCase("joint", lambda **kw: JointModel(**kw),
                      {"image": (("to_q", "to_k", "to_v"), DIM),
                       "text": (("add_q_proj", "add_k_proj", "add_v_proj"), TEXT_DIM)},
                      ("to_out.0", "to_add_out"), ("hidden_states", "encoder_hidden_states")),
    "functional": HostCase("functional", lambda **kw: TinyViT(FunctionalQKVAttention, **kw),
                           {"input": (("qkv",), DIM)}, ("proj",), ("x",), needs_functional_host=True),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Agreement of two computations of the same function in one dtype (tiny model, values O(1)).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 4e-2, torch.float16: 6e-3}


# ---------------------------------------------------------------------------------- helpers
def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.3, adapter_name: str | None = None) -> None:
    """Give every adapter's A and B random non-zero values (a fresh adapter has B = 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in serial_lora_modules(model):
            for name, adapters in module.items():
                if adapter_name is not None and name != adapter_name:
                    continue
                for adapter in adapters.values():
                    for weight in (adapter.down.weight, adapter.up.weight):
                        weight.copy_(torch.randn(weight.shape, generator=generator) * std)


def hand_merged_reference(base: nn.Module, adapted: nn.Module, strengths: Mapping[str, float]) -> nn.Module:
    """A float64 copy of `base` whose q/k/v weights are W (I + sum_a strength_a·B_a A_a), computed by hand.

    `strengths` gives s·w per adapter name, computed by the test from its config (not read from the
    core). Only the projections' weights change, so the copy still feeds its gate, residual and
    output projection the original x: that is the definition of Serial LoRA.
    """
    reference = copy.deepcopy(base).double()
    for attention, module in serial_lora_modules(adapted):
        for stream, spec in module.stream_specs.items():
            features = module.stream_features(stream)
            transform = torch.eye(features, dtype=torch.float64)
            for name, adapters in module.items():
                if stream in adapters:
                    a = adapters[stream]
                    transform = transform + strengths[name] * (a.up.weight.double() @ a.down.weight.double())
            for path in spec.projections:
                layer = reference.get_submodule(f"{attention}.{path}" if attention else path)
                with torch.no_grad():
                    layer.weight.copy_(layer.weight @ transform)
    return reference


def run(model: nn.Module, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, so that -0.0 != 0.0 and NaN == NaN (bit-for-bit comparison)."""
    return tensor.detach().contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


_HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def snapshot(model: nn.Module) -> dict:
    """Everything a failed load must leave as it was: tensors (bits), modules, hooks, flags, adapter state."""
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    modules = [(name, id(m), type(m), m.training) for name, m in model.named_modules()]
    parameters = [(name, id(p), p.requires_grad) for name, p in model.named_parameters()]
    hooks = {name: {h: dict(getattr(m, h, {})) for h in _HOOK_DICTS} for name, m in model.named_modules()}
    adapters = {}
    for name, module in serial_lora_modules(model):
        adapters[name] = (
            module.enabled, module.merged, list(module.keys()), dict(module._hooks), module._attention_hook,
            {a: {s: (ad.scaling, ad.scale, ad.rank) for s, ad in ads.items()} for a, ads in module.items()},
        )
    return {"state": state, "modules": modules, "parameters": parameters, "hooks": hooks, "adapters": adapters}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    """Fail with the first difference between `model` and a `snapshot` taken earlier."""
    after = snapshot(model)
    assert list(after["state"]) == list(before["state"]), "state_dict keys changed"
    for key, tensor in before["state"].items():
        assert same_bits(after["state"][key], tensor), f"{key} changed"
    for part in ("modules", "parameters", "hooks", "adapters"):
        assert after[part] == before[part], f"{part} changed"


@contextlib.contextmanager
def host_registered(case: HostCase) -> Iterator[HostCase]:
    """Register the case's extra host (if any) for the duration, then restore the global registry."""
    with registered(*([FUNCTIONAL_HOST] if case.needs_functional_host else [])):
        yield case


# ---------------------------------------------------------------------------------- adapter files
ARCHITECTURE = "tiny_vit_d2_w16"


def source_model(case, dtype=torch.float32, architecture=ARCHITECTURE, seed=4, model_kwargs=None, **config):
    """A model with a trained-looking (random, non-zero) adapter, from base weights of seed 0."""
    model = case.model(dtype, **(model_kwargs or {}))
    setattr(model, ARCHITECTURE_ATTRIBUTE, architecture)
    inject_serial_lora(model, SerialLoraConfig(**{"rank": 4, "alpha": 6.0, **config}))
    randomize_adapters(model, seed=seed)
    return model


def target_model(case, dtype=torch.float32, architecture=ARCHITECTURE, **kwargs):
    model = case.model(dtype, **kwargs)
    setattr(model, ARCHITECTURE_ATTRIBUTE, architecture)
    return model


def file_tensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(os.fspath(path), framework="pt") as handle:
        # Cloned: a tensor of safe_open is a live view of the memory-mapped file.
        return {k: handle.get_tensor(k).clone() for k in handle.keys()}, dict(handle.metadata())


@dataclass
class FileContext:
    """A valid file of the fused model (depth 2, width 16, rank 4) and a folder for bad ones."""

    folder: Path
    good: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    def rewrite(self, tensors=None, metadata=None, name="bad.safetensors", **changes) -> Path:
        """A file with a valid checksum over edited tensors/metadata (so the intended check fires)."""
        meta = {k: v for k, v in (metadata or self.metadata).items() if k != "sha256"}
        meta.update(changes)
        return write_file(self.folder / name, tensors if tensors is not None else self.tensors, meta)

    def metadata_without(self, *fields: str) -> dict[str, str]:
        return {k: v for k, v in self.metadata.items() if k not in fields}

    def raw(self, data: bytes, name="bad.safetensors") -> Path:
        path = self.folder / name
        path.write_bytes(data)
        return path


def base_weights_file(case: HostCase, folder: Path) -> Path:
    """The base model's weights (seed 0, as `HostCase.model`) as a .safetensors file, for exports."""
    from safetensors.torch import save_file

    path = folder / f"base_{case.name}.safetensors"
    save_file({k: v.contiguous() for k, v in case.model().state_dict().items()}, path)
    return path

