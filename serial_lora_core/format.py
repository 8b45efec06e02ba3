"""The Serial LoRA file format (the only module that knows it): safetensors, key names, metadata.

Keys: `<attention path>.serial_lora.<stream>.down.weight` (A, r x d) and `...up.weight` (B, d x r).
Adapter tensors are never called lora_A/lora_B/lora_up/lora_down, so a standard LoRA loader
(diffusers, ComfyUI) refuses the file instead of silently misapplying it.

Metadata (safetensors `__metadata__`, all strings):
    format="serial_lora", format_version="1", rank, alpha, use_rslora ("true"/"false"), dropout,
    streams (JSON {stream: [projection, ...]}), hosts (JSON list), architecture, base_model,
    dtype, model_attention_modules (how many attention modules the source model had, adapted or
    not: a file for a deeper or shallower model is refused), created_by, sha256 (over the metadata and every tensor: any corruption is detected).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import SerialLoraFileError

FORMAT_NAME = "serial_lora"
FORMAT_VERSION = 1
CREATED_BY = "serial-lora 0.1.0"

_KEY = re.compile(r"^(?:(?P<attention>.+)\.)?serial_lora\.(?P<stream>[A-Za-z_]\w*)\.(?P<part>down|up)\.weight$")
_STANDARD_LORA_MARKERS = ("lora_A", "lora_B", "lora_up", "lora_down", "lora.up", "lora.down")
_FLOAT_DTYPES = {torch.float32, torch.float16, torch.bfloat16}


def adapter_key(attention: str, stream: str, part: str) -> str:
    """The file key of one adapter matrix; `part` is "down" (A) or "up" (B)."""
    prefix = f"{attention}." if attention else ""
    return f"{prefix}serial_lora.{stream}.{part}.weight"


def parse_key(key: str) -> tuple[str, str, str] | None:
    """(attention path, stream, part) of a file key, or None if it is not a Serial LoRA key."""
    match = _KEY.match(key)
    if match is None:
        return None
    return match["attention"] or "", match["stream"], match["part"]


@dataclass(frozen=True)
class StreamWeights:
    """One stream's pair as read from a file."""

    down: torch.Tensor  # A: r x d
    up: torch.Tensor  # B: d x r


@dataclass(frozen=True)
class AdapterFile:
    """A validated Serial LoRA file: weights by (attention, stream), and its metadata."""

    path: str
    weights: dict[tuple[str, str], StreamWeights]
    metadata: dict[str, str]

    @property
    def rank(self) -> int:
        return int(self.metadata["rank"])

    @property
    def alpha(self) -> float:
        return float(self.metadata["alpha"])

    @property
    def use_rslora(self) -> bool:
        return self.metadata["use_rslora"] == "true"

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def streams(self) -> dict[str, list[str]]:
        """stream -> the projections it feeds on the model the adapter was trained on."""
        return json.loads(self.metadata["streams"])

    @property
    def architecture(self) -> str:
        return self.metadata.get("architecture", "")

    @property
    def model_attention_modules(self) -> int | None:
        """How many attention modules the model it was saved from had (adapted or not)."""
        value = self.metadata.get("model_attention_modules")
        return int(value) if value and value.isdigit() else None

    @property
    def attentions(self) -> list[str]:
        return sorted({attention for attention, _ in self.weights})

    @property
    def num_parameters(self) -> int:
        return sum(w.down.numel() + w.up.numel() for w in self.weights.values())


def _checksum(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(k for k in metadata if k != "sha256"):
        digest.update(f"{key}={metadata[key]}\n".encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_metadata(
    *,
    rank: int,
    alpha: float,
    use_rslora: bool,
    dropout: float,
    streams: Mapping[str, list[str]],
    hosts: list[str],
    architecture: str,
    base_model: str | None,
    dtype: str,
    model_attention_modules: int,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The `__metadata__` of a Serial LoRA file (before its checksum)."""
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "rank": str(int(rank)),
        "alpha": repr(float(alpha)),
        "use_rslora": "true" if use_rslora else "false",
        "dropout": repr(float(dropout)),
        "streams": json.dumps({s: list(p) for s, p in sorted(streams.items())}),
        "hosts": json.dumps(sorted(hosts)),
        "architecture": architecture,
        "base_model": base_model or "",
        "dtype": dtype,
        "model_attention_modules": str(int(model_attention_modules)),
        "created_by": CREATED_BY,
    }
    for key, value in (extra or {}).items():
        if key in metadata or key == "sha256":
            raise SerialLoraFileError(f"extra metadata key {key!r} is reserved by the file format; rename it")
        metadata[key] = str(value)
    return metadata


def write_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write tensors + metadata (+ checksum) atomically: a temp file in the same folder, then a rename."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise SerialLoraFileError(f"adapter files are .safetensors; got path {str(path)!r}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = dict(metadata)
    metadata["sha256"] = _checksum(metadata, tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _fail(path: str, message: str) -> SerialLoraFileError:
    return SerialLoraFileError(f"{path}: {message}")


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not os.path.isfile(path):
        raise _fail(path, "no such file")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head == b"PK\x03\x04":
        raise _fail(path, "is a zip/pickle checkpoint (torch.save .pt/.bin/.ckpt), not safetensors; "
                    "it is never unpickled here. Re-save the adapter with save_serial_lora().")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError / OSError / ValueError variants
        raise _fail(path, f"is not a readable safetensors file ({type(err).__name__}: {err}); it may be "
                    "truncated, corrupt, or a pickle checkpoint (never unpickled here): re-download or re-save it") from err
    return tensors, dict(metadata)


def read_file(path: str | os.PathLike) -> AdapterFile:
    """Read and validate a Serial LoRA file on its own (the model is not involved yet)."""
    path = os.fspath(path)
    tensors, metadata = _read_safetensors(path)
    if metadata.get("format") != FORMAT_NAME:
        standard = [k for k in tensors if any(m in k for m in _STANDARD_LORA_MARKERS)]
        if standard:
            raise _fail(path, f"is a standard LoRA (e.g. key {standard[0]!r}), not a Serial LoRA; "
                        "load it with your framework's LoRA loader (e.g. pipe.load_lora_weights)")
        raise _fail(path, f"is not a Serial LoRA file (metadata format={metadata.get('format')!r}, "
                    f"expected {FORMAT_NAME!r})")
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise _fail(path, f"has an invalid format_version {metadata.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise _fail(path, f"uses format version {version}, newer than this serial-lora ({FORMAT_VERSION}); upgrade serial-lora")
    if version < 1:
        raise _fail(path, f"has an invalid format_version {version}")
    expected = metadata.get("sha256")
    if expected is None or expected != _checksum(metadata, tensors):
        raise _fail(path, "fails its sha256 check: the file is corrupt or was edited; re-download or re-save it")
    try:
        rank = int(metadata["rank"])
        alpha = float(metadata["alpha"])
        streams = json.loads(metadata["streams"])
        if metadata["use_rslora"] not in ("true", "false"):
            raise ValueError("use_rslora must be 'true' or 'false'")
    except (KeyError, ValueError, TypeError) as err:
        raise _fail(path, f"has invalid metadata ({type(err).__name__}: {err})") from err
    if rank < 1 or not math.isfinite(alpha) or not isinstance(streams, dict):
        raise _fail(path, f"has invalid metadata: rank={rank}, alpha={alpha}, streams={streams!r}")

    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = parse_key(key)
        if parsed is None:
            raise _fail(path, f"has an unexpected key {key!r}; Serial LoRA keys look like "
                        "'<attention>.serial_lora.<stream>.down.weight'")
        attention, stream, part = parsed
        if stream not in streams:
            raise _fail(path, f"key {key!r} names stream {stream!r}, which the metadata does not declare ({sorted(streams)})")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise _fail(path, f"key {key!r} has dtype {tensor.dtype}; adapter weights are float32/float16/bfloat16")
        if tensor.dim() != 2:
            raise _fail(path, f"key {key!r} has shape {tuple(tensor.shape)}; expected a matrix")
        if not torch.isfinite(tensor).all():
            raise _fail(path, f"key {key!r} contains NaN or inf values; the adapter diverged in training")
        parts.setdefault((attention, stream), {})[part] = tensor

    weights = {}
    for (attention, stream), pair in sorted(parts.items()):
        for part in ("down", "up"):
            if part not in pair:
                raise _fail(path, f"key {adapter_key(attention, stream, part)!r} is missing "
                            f"(its pair {adapter_key(attention, stream, 'up' if part == 'down' else 'down')!r} is present)")
        down, up = pair["down"], pair["up"]
        if down.shape[0] != rank or up.shape[1] != rank or up.shape[0] != down.shape[1]:
            raise _fail(path, f"{adapter_key(attention, stream, 'down')!r} has shape {tuple(down.shape)} and "
                        f"{adapter_key(attention, stream, 'up')!r} has shape {tuple(up.shape)}; expected "
                        f"(r, d) and (d, r) with r = metadata rank {rank}")
        weights[(attention, stream)] = StreamWeights(down=down, up=up)
    if not weights:
        raise _fail(path, "contains no adapter weights")
    return AdapterFile(path=path, weights=weights, metadata=metadata)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a Serial LoRA file (after full validation)."""
    return read_file(path).metadata
