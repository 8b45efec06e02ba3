"""`SerialLoraAttention`: Serial LoRA on one attention module.

It wraps the attention's q/k/v projections with forward pre-hooks instead of replacing modules, so
the host keeps its own module tree, attribute access and state-dict keys (pretrained checkpoints,
processors, gradient checkpointing and `torch.compile` keep working). It lives as the attention's
child `serial_lora`, which puts adapter weights at `<attention>.serial_lora.<adapter>.<stream>.*`.

Each stream is adapted where its input enters: by a pre-hook on each of its projections, or (for
attention modules that read the projection weights themselves, `StreamSpec.input_argument`) by the
attention's pre-hook on the forward argument that carries it. The hooks are plain functions that
find their adapters from the module they run on, never from a reference taken at injection time:
the replicas `nn.DataParallel` makes share the original's hook functions but not its adapters.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import fx, nn
from torch.utils.hooks import RemovableHandle

from .adapter import StreamAdapter
from .config import SerialLoraConfig
from .errors import SerialLoraError
from .hosts import AttentionHost, StreamSpec, get_submodule

ATTRIBUTE = "serial_lora"
BINDING = "_serial_lora_binding"
"""Entry in a hooked projection's `__dict__`: (its `SerialLoraAttention`, the stream it reads)."""


def _attention_pre_hook(attention: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Runs before every call of an adapted attention module (once per call, not per projection)."""
    owner = attention._modules[ATTRIBUTE]
    if owner.__dict__["_attention_module"] is not attention:
        owner.bind(attention)  # a replica made by nn.DataParallel, running for the first time
    if owner._cache:  # the adapted input is shared by q, k and v only within one call
        owner._cache.clear()
    if owner._argument_streams:
        return owner._adapt_arguments(args, kwargs)
    return None


def _projection_pre_hook(projection: nn.Module, args: tuple) -> tuple | None:
    """Runs before every call of a hooked q/k/v projection: the hot path, kept to a lookup and a call."""
    owner, stream = projection.__dict__[BINDING]
    return owner._adapt_projection_input(stream, args)


_INSTANCE_ATTRIBUTES = frozenset({"host", "stream_specs", "enabled"})
"""The public attributes `SerialLoraAttention.__init__` sets (an adapter name must not be one)."""


def check_adapter_name(adapter_name: object) -> str:
    """`adapter_name` if it is a Python identifier (it becomes an attribute of `SerialLoraAttention`) that
    is not already one of its attributes (`forward`, `training`, `items`, `merge`, `host`, `_cache`, ...:
    adding it used to fail halfway with a bare KeyError), else a clear error."""
    if not isinstance(adapter_name, str) or not adapter_name.isidentifier():
        raise SerialLoraError(f"adapter_name must be a Python identifier such as 'default', got {adapter_name!r}")
    if (adapter_name.startswith("_") or adapter_name in _INSTANCE_ATTRIBUTES or hasattr(SerialLoraAttention, adapter_name)
            or hasattr(nn.ModuleDict(), adapter_name)):
        raise SerialLoraError(f"adapter_name {adapter_name!r} is the name of an attribute of the adapters' module (or "
                              "starts with '_'); pick another name, e.g. 'default' or 'style'")
    return adapter_name


class SerialLoraAttention(nn.ModuleDict):
    """Adapters of one attention module: adapter name -> stream -> `StreamAdapter`.

    Each adapted stream's input x becomes x + sum_a s_a·m_a·B_a·A_a·x before it reaches that
    stream's q/k/v projections, and reaches nothing else. With several projections per stream
    (split q/k/v) the adapted input is computed once per forward and reused.
    """

    def __init__(self, attention: nn.Module, host: AttentionHost, streams: Mapping[str, StreamSpec]) -> None:
        super().__init__()
        # Kept outside `_modules`: the attention owns this module, not the other way round (and a
        # deepcopy of the model maps this reference to the copied attention).
        self.__dict__["_attention_module"] = attention
        self.host = host
        self.stream_specs = dict(streams)
        self.enabled = True
        self._originals: dict[str, torch.Tensor] = {}  # projection path -> weight before merging
        # A plain bool beside `_originals`: torch.compile guards on it, so a graph compiled before a merge
        # is not reused after it (it does not re-check a dict's emptiness, and ran the adapters twice).
        self._merged = False
        self._hooks: dict[str, list[RemovableHandle]] = {}  # stream -> its projection hooks
        self._attention_hook: RemovableHandle | None = None
        self._argument_streams: dict[str, tuple[str, int]] = {}  # hooked stream -> (argument name, position)
        # stream -> [input x, adapted input, projections still to read it] within one attention call
        self._cache: dict[str, list] = {}

    # ---------------------------------------------------------------- structure
    @property
    def attention(self) -> nn.Module:
        return self.__dict__["_attention_module"]

    @property
    def merged(self) -> bool:
        return self._merged

    def projection(self, path: str) -> nn.Linear:
        layer = get_submodule(self.attention, path)
        if not isinstance(layer, nn.Linear):
            raise SerialLoraError(f"projection {path!r} is not an nn.Linear in {type(self.attention).__name__}")
        return layer

    def stream_features(self, stream: str) -> int:
        """d of a stream: the in_features of its projections."""
        return self.projection(self.stream_specs[stream].projections[0]).in_features

    def adapted_streams(self) -> list[str]:
        """The streams some adapter adapts, in the host's order."""
        present = {stream for adapters in self.values() for stream in adapters}
        return [stream for stream in self.stream_specs if stream in present]

    def adapted_projections(self) -> list[tuple[str, str, nn.Parameter]]:
        """(stream, projection path, weight) of every projection an adapter changes."""
        return [(stream, path, self.projection(path).weight)
                for stream in self.adapted_streams() for path in self.stream_specs[stream].projections]

    def add_adapter(self, adapter_name: str, config: SerialLoraConfig, streams: Iterable[str]) -> None:
        """Create adapter `adapter_name` on `streams` (identity at creation: B = 0)."""
        if adapter_name in self:
            raise SerialLoraError(
                f"adapter {adapter_name!r} already exists on this attention; pick another adapter_name "
                "or delete it first with delete_serial_lora_adapter()"
            )
        if self.merged:
            raise SerialLoraError("cannot add an adapter while adapters are merged; call unmerge_serial_lora() first")
        adapters = nn.ModuleDict()
        for stream in streams:
            if stream not in self.stream_specs:
                raise SerialLoraError(
                    f"stream {stream!r} does not exist on {type(self.attention).__name__}; "
                    f"it has {sorted(self.stream_specs)}"
                )
            weight = self.projection(self.stream_specs[stream].projections[0]).weight
            adapters[stream] = StreamAdapter(
                features=self.stream_features(stream),
                rank=config.rank,
                scaling=config.scaling,
                dropout=config.dropout,
                init=config.init,
                dtype=config.dtype or weight.dtype,
                device=weight.device,
            )
            adapters[stream].config = config
        # New modules start in training mode; follow the attention's mode so that an adapter added
        # to a model in eval() does not apply dropout at inference.
        adapters.train(self.attention.training)
        self[adapter_name] = adapters
        for stream in adapters:
            self._install_hooks(stream)

    def delete_adapter(self, adapter_name: str) -> None:
        if self.merged:
            raise SerialLoraError("cannot delete an adapter while merged; call unmerge_serial_lora() first")
        del self[adapter_name]
        for stream in list(self._hooks):
            if stream not in self.adapted_streams():
                self._remove_stream_hooks(stream)

    def remove_hooks(self) -> None:
        """Detach from the attention's projections (the adapters stay as plain modules)."""
        for stream in list(self._hooks):
            self._remove_stream_hooks(stream)

    def bind(self, attention: nn.Module) -> None:
        """Make `attention` (a replica of the one this module was created on) the attention it adapts.

        `nn.DataParallel` replicates modules by copying their `__dict__`, so a replica's references
        (to its attention, from its projections) still point at the original; this re-points them
        at the replica's own modules, and gives the replica its own per-call cache.
        """
        self.__dict__["_attention_module"] = attention
        self.__dict__["_cache"] = {}
        for stream in self._hooks:
            if stream not in self._argument_streams:
                for path in self.stream_specs[stream].projections:
                    self.projection(path).__dict__[BINDING] = (self, stream)

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this on every submodule before compiling anything.
        raise SerialLoraError(
            "torch.jit.script cannot compile a model with unmerged Serial LoRA adapters (they run as "
            "forward pre-hooks). For deployment call merge_and_unload_serial_lora(model) first, which "
            "leaves a plain model of the base architecture, or export the unmerged model with torch.export."
        )

    # ---------------------------------------------------------------- forward
    def _install_hooks(self, stream: str) -> None:
        if stream in self._hooks:
            return
        spec = self.stream_specs[stream]
        handles = []
        if spec.input_argument is not None:
            self._argument_streams[stream] = spec.input_argument
        else:
            layers = {}  # id -> layer: one layer under two names of this stream is hooked once
            for path in spec.projections:
                layer = self.projection(path)
                if layer.__dict__.get(BINDING) is not None:
                    raise SerialLoraError(
                        f"projection {path!r} of {type(self.attention).__name__} is already adapted for another "
                        "input stream or attention module (one nn.Linear shared by two of them); Serial LoRA "
                        "adapts each stream's own projections. Give each attention its own layer."
                    )
                layers[id(layer)] = layer
            for layer in layers.values():
                layer.__dict__[BINDING] = (self, stream)
                handles.append(layer.register_forward_pre_hook(_projection_pre_hook))
        self._hooks[stream] = handles
        if self._attention_hook is None:
            self._attention_hook = self.attention.register_forward_pre_hook(_attention_pre_hook, with_kwargs=True)

    def _remove_stream_hooks(self, stream: str) -> None:
        for handle in self._hooks.pop(stream):
            handle.remove()
        self._argument_streams.pop(stream, None)
        for path in self.stream_specs[stream].projections:
            layer = self.projection(path)
            if layer.__dict__.get(BINDING, (None,))[0] is self:
                del layer.__dict__[BINDING]
        if not self._hooks and self._attention_hook is not None:
            self._attention_hook.remove()
            self._attention_hook = None
            self._cache.clear()

    def _active(self, stream: str) -> list[StreamAdapter]:
        if not self.enabled or self.merged:
            return []
        return [a[stream] for a in self.values() if stream in a and a[stream].scale != 0]

    def adapt(self, stream: str, x: torch.Tensor) -> torch.Tensor:
        """(I + sum of the active adapters' s·m·B·A) x for one stream."""
        adapters = self._active(stream)
        if not adapters:
            return x
        out = x
        for adapter in adapters:
            out = adapter.add_to(out, x)
        return out

    def _adapt_projection_input(self, stream: str, args: tuple) -> tuple | None:
        # Hot path (runs for every q/k/v call): keep the Python work small.
        if not args:
            return None
        x = args[0]
        cached = self._cache.get(stream)
        if cached is not None and cached[0] is x:
            cached[2] -= 1
            if cached[2] == 0:  # the stream's last projection: free the adapted input now
                del self._cache[stream]
            return (cached[1], *args[1:])
        y = self.adapt(stream, x)
        if y is x:  # no active adapter on this stream
            return None
        uses_left = len(self.stream_specs[stream].projections) - 1
        if uses_left:
            self._cache[stream] = [x, y, uses_left]
        return (y, *args[1:])

    def _adapt_argument(self, stream: str, x: torch.Tensor) -> torch.Tensor:
        # torch.fx.symbolic_trace runs this hook on proxies: record plain tensor operations, with the
        # adapters' factors and on/off state as they are at trace time (projection hooks, by contrast,
        # stay live: fx keeps the projections as modules and their hooks run when the graph runs).
        if isinstance(x, fx.Proxy):
            out = x
            for adapter in self._active(stream):
                out = adapter.traceable_add_to(out, x)
            return out
        return self.adapt(stream, x)

    def _adapt_arguments(self, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        changed = False
        for stream, (name, position) in self._argument_streams.items():
            if not self._active(stream):
                continue
            if name in kwargs:
                x = kwargs[name]
            elif len(args) > position:
                x = args[position]
            else:
                continue
            y = self._adapt_argument(stream, x)
            # The same tensor passed again is the same stream: self-attention called as `attn(x, x, x)`
            # (torch's nn.MultiheadAttention, as open_clip does) gets the adapted input as query, key and value.
            args = tuple(y if a is x else a for a in args)
            kwargs = {k: (y if v is x else v) for k, v in kwargs.items()}
            changed = True
        return (args, kwargs) if changed else None

    # ---------------------------------------------------------------- merging
    def merged_weights(self, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """W + scale·sum_a s_a·m_a·(W B_a) A_a for every adapted projection, computed in float32.

        A weight tensor reached through several projection paths of one stream is computed once.
        Raises before anything changes if projections share weights with different changes, or if
        a result is not finite.
        """
        projections = self.adapted_projections()
        check_untied([(path, stream, weight) for stream, path, weight in projections])
        out = {}
        done = set()
        for stream, path, weight in projections:
            if id(weight) in done:
                continue
            done.add(id(weight))
            new = weight.detach().float()
            for adapters in self.values():
                if stream in adapters:
                    new = new + scale * adapters[stream].projection_delta(weight)
            # Checked after the cast: a float32 result can still overflow float16.
            new = new.to(weight.dtype)
            if not torch.isfinite(new).all():
                raise SerialLoraError(
                    f"merging into {path!r} gives non-finite {weight.dtype} weights (scale={scale}); "
                    "the adapter weights or the scale are too large or contain NaN/inf"
                )
            out[path] = new
        return out

    def merge(self, scale: float = 1.0) -> None:
        """Fold the adapters into the projection weights, keeping the originals for `unmerge`.

        All-or-nothing: whatever goes wrong (including running out of memory), the weights already
        written are restored before the error propagates.
        """
        if self.merged:
            raise SerialLoraError("adapters are already merged; call unmerge_serial_lora() before merging again")
        new_weights = self.merged_weights(scale)
        try:
            for path, new in new_weights.items():
                weight = self.projection(path).weight
                self._originals[path] = weight.detach().clone()
                with torch.no_grad():
                    weight.copy_(new)
            self._merged = bool(self._originals)
        except BaseException:
            self.unmerge()
            raise

    def unmerge(self) -> None:
        """Restore the projection weights saved by `merge`, bit for bit."""
        for path, original in reversed(self._originals.items()):
            with torch.no_grad():
                self.projection(path).weight.copy_(original)
        self._originals.clear()
        self._merged = False

    def forget_originals(self) -> None:
        """Keep the merged weights as the new base (used by merge-and-unload)."""
        self._originals.clear()
        self._merged = False


def _byte_span(tensor: torch.Tensor) -> tuple[int, int, int]:
    """(storage address, first byte, one past the last byte) that `tensor` can touch."""
    size = tensor.element_size()
    last = sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride())) if tensor.numel() else -1
    start = tensor.storage_offset() * size
    return tensor.untyped_storage().data_ptr(), start, start + (last + 1) * size


def _tied_error(first: str, second: str, what: str) -> SerialLoraError:
    return SerialLoraError(
        f"cannot merge: {first!r} and {second!r} share one weight tensor (tied weights), so merging would "
        f"change {what}. Keep the adapters unmerged (they run as hooks and are exact), or untie the weights "
        "first, e.g. `layer.weight = nn.Parameter(layer.weight.detach().clone())`."
    )


def check_untied(
    projections: Iterable[tuple[str, object, torch.Tensor]], others: Iterable[tuple[str, torch.Tensor]] = ()
) -> None:
    """Refuse to merge into weights that two adapted projections share (tied weights), or that a
    tensor no adapter changes shares (`others`: the model's other parameters and buffers).

    `projections` holds (projection name, what decides its change, weight). The same tensor under
    two names is fine when the change is the same (one stream's q and k being one layer); otherwise
    merging would put one attention's change into the other's projection as well, since both then
    compute with the one merged tensor. A tensor of `others` overlapping a projection's weight would
    silently take its change too (e.g. an output projection or a gate tied to q), so merged outputs
    would no longer equal unmerged ones.
    """
    by_storage: dict[int, list[tuple[int, int, str, object, torch.Tensor]]] = {}
    for name, group, weight in projections:
        address, start, end = _byte_span(weight)
        for other_start, other_end, other_name, other_group, other in by_storage.get(address, []):
            if start < other_end and other_start < end and not (weight is other and group == other_group):
                raise _tied_error(other_name, name, "both projections")
        by_storage.setdefault(address, []).append((start, end, name, group, weight))
    for name, tensor in others:
        address, start, end = _byte_span(tensor)
        for other_start, other_end, other_name, _, _ in by_storage.get(address, []):
            if start < other_end and other_start < end:
                raise _tied_error(other_name, name, f"{name!r} too, which no adapter changes")
