"""Host descriptions: which modules are attention, and which projections read which input stream.

The core never imports a host library. A host is described structurally, by attribute names (and
optionally class names), so supporting a new model family is one `register_host(...)` call:

    register_host(AttentionHost(
        name="my_attention",
        class_names=("MyAttention",),
        streams={"input": StreamSpec(projections=("wq", "wk", "wv"))},
    ))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from torch import nn

from .errors import SerialLoraError


@dataclass(frozen=True)
class StreamSpec:
    """One input stream of an attention module.

    Args:
        projections: attribute paths (dots allowed) of the `nn.Linear` layers that read this stream:
            the stream's q, k and v (one fused layer, or three). The output projection is never here.
        input_argument: set when the attention module does not call those projections as modules
            (e.g. `F.linear(x, self.qkv.weight, bias)`): the (name, position) of the `forward`
            argument that carries the stream. The adapter then transforms that argument, which is
            only correct when nothing but q, k and v reads it inside the module.
    """

    projections: tuple[str, ...]
    input_argument: tuple[str, int] | None = None

    def __post_init__(self) -> None:
        if not self.projections:
            raise SerialLoraError("StreamSpec.projections must name at least one projection layer")


@dataclass(frozen=True)
class AttentionHost:
    """How one family of attention modules reads its input streams.

    Args:
        name: identifier stored in adapter files.
        streams: stream name -> `StreamSpec`. A module has a stream when all its projections exist.
        class_names: if given, the module's class name must be one of these.
        condition: optional extra test on the module (e.g. "not cross-attention").
    """

    name: str
    streams: Mapping[str, StreamSpec]
    class_names: tuple[str, ...] = ()
    condition: Callable[[nn.Module], bool] | None = field(default=None, compare=False)

    def streams_of(self, module: nn.Module) -> dict[str, StreamSpec]:
        """The streams this host recognises on `module` (empty if the module is not such an attention)."""
        if self.class_names and type(module).__name__ not in self.class_names:
            return {}
        if self.condition is not None and not self.condition(module):
            return {}
        found = {}
        for stream, spec in self.streams.items():
            layers = [get_submodule(module, p) for p in spec.projections]
            if all(isinstance(layer, nn.Linear) for layer in layers):
                found[stream] = spec
        return found


def get_submodule(module: nn.Module, path: str) -> nn.Module | None:
    """`module.get_submodule(path)`, or None when it does not exist."""
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _not_cross_attention(module: nn.Module) -> bool:
    # In cross-attention, k and v read the other stream: one shared input transform would be wrong.
    return not getattr(module, "is_cross_attention", False)


FUSED_QKV = AttentionHost(
    name="fused_qkv",
    streams={"input": StreamSpec(projections=("qkv",))},
)
"""timm `Attention` (ViT, DeiT, CLIP-ViT), SAM's image-encoder attention, ComfyUI-style `qkv`."""

SPLIT_QKV = AttentionHost(
    name="split_qkv",
    streams={"input": StreamSpec(projections=("q_proj", "k_proj", "v_proj"))},
    condition=_not_cross_attention,
)
"""Separate q/k/v layers: Hugging Face CLIP, EVA-style attention."""

JOINT_QKV = AttentionHost(
    name="joint_qkv",
    streams={
        "image": StreamSpec(projections=("to_q", "to_k", "to_v")),
        "text": StreamSpec(projections=("add_q_proj", "add_k_proj", "add_v_proj")),
    },
    condition=_not_cross_attention,
)
"""diffusers `Attention`: `to_q/k/v` read the image tokens, `add_q/k/v_proj` (SD3 joint attention) the text."""

_HOSTS: list[AttentionHost] = [FUSED_QKV, SPLIT_QKV, JOINT_QKV]


def register_host(host: AttentionHost) -> AttentionHost:
    """Add `host`, tried before the ones already known (so a specific description wins over a generic one).

    Registering a host with a name already known replaces it.
    """
    if not isinstance(host, AttentionHost):
        raise TypeError(f"register_host expects an AttentionHost, got {type(host).__name__}")
    _HOSTS[:] = [h for h in _HOSTS if h.name != host.name]
    _HOSTS.insert(0, host)
    return host


def registered_hosts() -> tuple[AttentionHost, ...]:
    """The known hosts, in the order they are tried."""
    return tuple(_HOSTS)


def host_by_name(name: str) -> AttentionHost:
    """The registered host called `name`."""
    for host in _HOSTS:
        if host.name == name:
            return host
    raise SerialLoraError(
        f"unknown attention host {name!r}; known: {[h.name for h in _HOSTS]}. "
        "Import the integration that registers it (e.g. timm_plugin, diffusers_loader)."
    )


def match_host(module: nn.Module) -> tuple[AttentionHost, dict[str, StreamSpec]] | None:
    """The first host that recognises `module` as attention, with the streams it found."""
    for host in _HOSTS:
        streams = host.streams_of(module)
        if streams:
            return host, streams
    return None
