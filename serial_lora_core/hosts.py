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

import contextlib
import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

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

    def accepts(self, module: nn.Module) -> bool:
        """Whether `module` passes this host's class-name and condition tests (its projections aside)."""
        if self.class_names and type(module).__name__ not in self.class_names:
            return False
        return self.condition is None or bool(self.condition(module))

    def streams_of(self, module: nn.Module) -> dict[str, StreamSpec]:
        """The streams this host recognises on `module` (empty if the module is not such an attention)."""
        if not self.accepts(module):
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


KEY_VALUE_ARGUMENTS = frozenset({
    "key", "value", "keys", "values", "key_value_states", "kv_states", "kv", "k_x", "v_x",
    "encoder_hidden_states", "cross_attention_states", "context", "memory",
})
"""`forward` argument names that carry a key/value input separate from the query input
(SAM's `SamAttention(query, key, value)`, BART's `key_value_states`, BERT's `encoder_hidden_states`,
open_clip's `k_x`/`v_x`, the usual `context`)."""


@functools.cache
def _forward_takes_key_value(cls: type) -> bool:
    try:
        parameters = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):  # no introspectable signature: assume the worst
        return True
    return any(name in KEY_VALUE_ARGUMENTS for name in parameters)


def reads_separate_inputs(module: nn.Module) -> bool:
    """Whether q, k and v of `module` may read different tensors (so it is not one input stream).

    True for modules flagged `is_cross_attention` and for modules whose `forward` takes a separate
    key/value input (`KEY_VALUE_ARGUMENTS`), even when a given call passes the same tensor: a host
    that knows which argument feeds which projection must describe such a module explicitly,
    one stream per distinct input.
    """
    return bool(getattr(module, "is_cross_attention", False)) or _forward_takes_key_value(type(module))


def _reads_one_input(module: nn.Module) -> bool:
    return not reads_separate_inputs(module)


FUSED_QKV = AttentionHost(
    name="fused_qkv",
    streams={"input": StreamSpec(projections=("qkv",))},
)
"""timm `Attention` (ViT, DeiT, CLIP-ViT), SAM's image-encoder attention, ComfyUI-style `qkv`."""

SPLIT_QKV = AttentionHost(
    name="split_qkv",
    streams={"input": StreamSpec(projections=("q_proj", "k_proj", "v_proj"))},
    condition=_reads_one_input,
)
"""Separate q/k/v layers reading one input: Hugging Face CLIP, EVA-style attention. Never a module whose
projections may read different tensors (`reads_separate_inputs`): SAM's mask-decoder attention or any
cross-attention is one stream per input, which only an explicit host can describe."""

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

    Registering a host with a name already known replaces it. For a temporary registration (tests,
    one-off models) use `with registered(host): ...`.
    """
    if not isinstance(host, AttentionHost):
        raise TypeError(f"register_host expects an AttentionHost, got {type(host).__name__}")
    _HOSTS[:] = [h for h in _HOSTS if h.name != host.name]
    _HOSTS.insert(0, host)
    return host


def unregister_host(name: str) -> AttentionHost:
    """Remove the host called `name` and return it; an unknown name is an error listing the known ones."""
    for index, host in enumerate(_HOSTS):
        if host.name == name:
            return _HOSTS.pop(index)
    raise SerialLoraError(f"no attention host named {name!r} is registered; known: {[h.name for h in _HOSTS]}")


@contextlib.contextmanager
def registered(*hosts: AttentionHost) -> Iterator[tuple[AttentionHost, ...]]:
    """Register `hosts` for the duration of a `with` block, then restore the registry exactly as it was
    (a host they replaced by name comes back in its place)."""
    saved = list(_HOSTS)
    try:
        for host in hosts:
            register_host(host)
        yield hosts
    finally:
        _HOSTS[:] = saved


def registered_hosts() -> tuple[AttentionHost, ...]:
    """The known hosts, in the order they are tried."""
    return tuple(_HOSTS)


def match_host(module: nn.Module) -> tuple[AttentionHost, dict[str, StreamSpec]] | None:
    """The first host that recognises `module` as attention, with the streams it found."""
    for host in _HOSTS:
        streams = host.streams_of(module)
        if streams:
            return host, streams
    return None
