"""`SerialLoraAttention`: Serial LoRA on one attention module.

It wraps the attention's q/k/v projections with forward pre-hooks instead of replacing modules, so
the host keeps its own module tree, attribute access and state-dict keys (pretrained checkpoints,
processors, gradient checkpointing and `torch.compile` keep working). It lives as the attention's
child `serial_lora`, which puts adapter weights at `<attention>.serial_lora.<adapter>.<stream>.*`.
"""

from __future__ import annotations

import functools
from typing import Iterable, Mapping

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .adapter import StreamAdapter
from .config import SerialLoraConfig
from .errors import SerialLoraError
from .hosts import AttentionHost, StreamSpec, get_submodule

ATTRIBUTE = "serial_lora"


class SerialLoraAttention(nn.ModuleDict):
    """Adapters of one attention module: adapter name -> stream -> `StreamAdapter`.

    Each adapted stream's input x becomes x + sum_a s_a·w_a·B_a·A_a·x before it reaches that
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
        self._hooks: dict[str, list[RemovableHandle]] = {}
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cache_hooks: list[RemovableHandle] = []

    # ---------------------------------------------------------------- structure
    @property
    def attention(self) -> nn.Module:
        return self.__dict__["_attention_module"]

    @property
    def merged(self) -> bool:
        return bool(self._originals)

    def projection(self, path: str) -> nn.Linear:
        layer = get_submodule(self.attention, path)
        if not isinstance(layer, nn.Linear):
            raise SerialLoraError(f"projection {path!r} is not an nn.Linear in {type(self.attention).__name__}")
        return layer

    def stream_features(self, stream: str) -> int:
        """d of a stream: the in_features of its projections."""
        return self.projection(self.stream_specs[stream].projections[0]).in_features

    def adapted_streams(self) -> set[str]:
        return {stream for adapters in self.values() for stream in adapters}

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
                scale=config.scale,
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
                for handle in self._hooks.pop(stream):
                    handle.remove()

    def remove_hooks(self) -> None:
        """Detach from the attention's projections (the adapters stay as plain modules)."""
        for handles in self._hooks.values():
            for handle in handles:
                handle.remove()
        for handle in self._cache_hooks:
            handle.remove()
        self._hooks.clear()
        self._cache_hooks.clear()
        self._cache.clear()

    # ---------------------------------------------------------------- forward
    def _install_hooks(self, stream: str) -> None:
        if stream in self._hooks:
            return
        spec = self.stream_specs[stream]
        if spec.input_argument is not None:
            hook = functools.partial(self._argument_hook, stream, *spec.input_argument)
            handles = [self.attention.register_forward_pre_hook(hook, with_kwargs=True)]
        else:
            hook = functools.partial(self._projection_hook, stream)
            handles = [self.projection(p).register_forward_pre_hook(hook) for p in spec.projections]
        self._hooks[stream] = handles
        if len(spec.projections) > 1 and not self._cache_hooks:
            # The adapted input is shared by q, k and v only within one call of the attention.
            self._cache_hooks = [self.attention.register_forward_pre_hook(self._clear_cache)]

    def _clear_cache(self, *_: object) -> None:
        self._cache.clear()

    def _active(self, stream: str) -> list[StreamAdapter]:
        if not self.enabled or self.merged:
            return []
        return [a[stream] for a in self.values() if stream in a and a[stream].weight != 0]

    def adapt(self, stream: str, x: torch.Tensor) -> torch.Tensor:
        """(I + sum of the active adapters' s·w·B·A) x for one stream."""
        adapters = self._active(stream)
        if not adapters:
            return x
        out = x
        for adapter in adapters:
            out = adapter.add_to(out, x)
        return out

    def _projection_hook(self, stream: str, _module: nn.Module, args: tuple) -> tuple | None:
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

    def _argument_hook(self, stream: str, name: str, position: int, _module: nn.Module, args: tuple, kwargs: dict):
        if not self._active(stream):
            return None
        if name in kwargs:
            kwargs = {**kwargs, name: self.adapt(stream, kwargs[name])}
        elif len(args) > position:
            args = (*args[:position], self.adapt(stream, args[position]), *args[position + 1 :])
        return args, kwargs

    # ---------------------------------------------------------------- merging
    def merged_weights(self, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """W + scale·sum_a s_a·w_a·(W B_a) A_a for every adapted projection, computed in float32.

        Raises before anything changes if a result is not finite.
        """
        out = {}
        for stream in self.adapted_streams():
            adapters = [a[stream] for a in self.values() if stream in a]
            for path in self.stream_specs[stream].projections:
                weight = self.projection(path).weight
                new = weight.detach().float()
                for adapter in adapters:
                    new = new + scale * adapter.projection_delta(weight)
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
        """Fold the adapters into the projection weights, keeping the originals for `unmerge`."""
        if self.merged:
            raise SerialLoraError("adapters are already merged; call unmerge_serial_lora() before merging again")
        new_weights = self.merged_weights(scale)
        for path, new in new_weights.items():
            weight = self.projection(path).weight
            self._originals[path] = weight.detach().clone()
            with torch.no_grad():
                weight.copy_(new)

    def unmerge(self) -> None:
        """Restore the projection weights saved by `merge`, bit for bit."""
        for path, original in self._originals.items():
            with torch.no_grad():
                self.projection(path).weight.copy_(original)
        self._originals.clear()

    def forget_originals(self) -> None:
        """Keep the merged weights as the new base (used by merge-and-unload)."""
        self._originals.clear()
