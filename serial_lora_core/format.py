"""The Serial LoRA file format (the only module that knows it): safetensors, key names, metadata.

Keys (matched exactly, whole key):
    `<attention path>.serial_lora.<stream>.down.weight` (A, r x d) and `...up.weight` (B, d x r);
    `modules_to_save.<module path>.<tensor name>` (format version 2): full tensors of extra
    trainable modules (e.g. a new classification head), as PEFT's `modules_to_save`.
Adapter tensors are never called lora_A/lora_B/lora_up/lora_down, so a standard LoRA loader
(diffusers, ComfyUI) refuses the file instead of silently misapplying it.

Metadata (safetensors `__metadata__`, all strings; every field is validated by one schema, `_SCHEMA`):
    format="serial_lora"; format_version (ASCII digits); rank (>= 1); alpha (finite decimal whose
    scaling alpha/r fits float32); use_rslora ("true"/"false"); dropout (in [0, 1)); streams (JSON
    {stream: [projection, ...]}: the q/k/v projections each stream feeds, never an output
    projection, see `OUTPUT_PROJECTIONS`); hosts (JSON list of the host names that read the streams:
    `info` shows them, an export picks its key prefix by them, and a host known here must agree with
    `streams`); architecture; base_model; dtype (float32/float16/bfloat16, the stored weights');
    model_attention_modules (how many modules of the source model have the file's streams, adapted
    or not, counted by `files.count_attention_modules`: a file for a deeper or shallower model is
    refused); created_by; modules_to_save (JSON list of module paths, version 2 only); sha256 (over
    the metadata and every tensor: corruption is detected; it is a checksum, not a signature).
Fields the schema does not know (user metadata) are kept as strings and never interpreted.

Versions: a file is written as version 1 unless it uses a version-2 feature (`modules_to_save`),
so files without it stay readable by older serial-lora releases; this release reads 1 and 2.

Tensors are read from a private in-memory copy of the file (no memory map): rewriting or truncating
the file later cannot change (or crash) an `AdapterFile` that was already validated.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from .attention import ATTRIBUTE
from .config import FLOAT32_MAX, dtype_name
from .errors import SerialLoraFileError
from .formula import scaling as scaling_rule
from .version import __version__

FORMAT_NAME = "serial_lora"
FORMAT_VERSION = 2
"""The newest format version this release reads and writes (see the module docstring)."""
MODULES_TO_SAVE_VERSION = 2
CREATED_BY = f"serial-lora {__version__}"
ADAPTER_SEGMENT = ATTRIBUTE  # keys mirror the module tree: the attention's `serial_lora` child
MODULES_TO_SAVE = "modules_to_save"
FORMAT_FIELD = "format"
CHECKSUM_FIELD = "sha256"

OUTPUT_PROJECTIONS = frozenset({"proj", "out_proj", "o_proj", "c_proj", "to_out", "to_out.0", "to_add_out", "wo"})
"""Names models give an attention's OUTPUT projection (timm, PyTorch/transformers, Llama-style, GPT-2,
diffusers, Meta). A stream is the input of q, k and v: the output projection reads the attention's
result, never the stream, so a file whose stream claims one of these (as its last path segment or two)
is refused instead of patching the wrong layer."""

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_PATH = r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*"
_KEY = re.compile(rf"(?:(?P<attention>{_PATH})\.)?{ADAPTER_SEGMENT}\.(?P<stream>{_NAME})\.(?P<part>down|up)\.weight", re.ASCII)
_STANDARD_LORA_MARKERS = ("lora_A", "lora_B", "lora_up", "lora_down", "lora.up", "lora.down")
_FLOAT_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
_FIX = "re-save the adapter with save_serial_lora() (the file was edited or written by another tool)"


def adapter_key(attention: str, stream: str, part: str) -> str:
    """The file key of one adapter matrix; `part` is "down" (A) or "up" (B)."""
    prefix = f"{attention}." if attention else ""
    return f"{prefix}{ADAPTER_SEGMENT}.{stream}.{part}.weight"


def parse_key(key: str) -> tuple[str, str, str] | None:
    """(attention path, stream, part) of a file key, or None unless it is exactly one adapter slot."""
    match = _KEY.fullmatch(key)
    if match is None:
        return None
    attention = match["attention"] or ""
    if ADAPTER_SEGMENT in attention.split("."):  # an adapter inside an adapter is not a slot
        return None
    return attention, match["stream"], match["part"]


def modules_to_save_key(module: str, name: str) -> str:
    """The file key of tensor `name` (e.g. "weight") of module `module` saved whole."""
    return f"{MODULES_TO_SAVE}.{module}.{name}"


def is_output_projection(projection: str) -> bool:
    """Whether `projection` is named like an attention's output projection (see `OUTPUT_PROJECTIONS`)."""
    segments = projection.split(".")
    return any(".".join(segments[-n:]) in OUTPUT_PROJECTIONS for n in (1, 2))


# ------------------------------------------------------------------------------------ metadata schema
def _digits(text: str, low: int, high: int) -> int:
    if not re.fullmatch(r"[0-9]{1,9}", text, re.ASCII):
        raise ValueError(f"expected ASCII digits (an integer from {low} to {high})")
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"expected an integer from {low} to {high}")
    return value


def _decimal(text: str) -> float:
    if not re.fullmatch(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?", text, re.ASCII):
        raise ValueError("expected a finite decimal number such as 8.0")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


def _probability(text: str) -> float:
    value = _decimal(text)
    if not 0.0 <= value < 1.0:
        raise ValueError("expected a probability in [0, 1)")
    return value


def _boolean(text: str) -> bool:
    if text not in ("true", "false"):
        raise ValueError("expected 'true' or 'false'")
    return text == "true"


def _json(text: str) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"a JSON object repeats a key ({sorted(k for k in keys if keys.count(k) > 1)[0]!r})")
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg} at character {err.pos})") from None


def _names(value: Any, pattern: str, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a JSON list of {what} strings")
    bad = [v for v in value if not re.fullmatch(pattern, v, re.ASCII)]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a valid {what} (ASCII letters, digits, '_' and '.')")
    if len(set(value)) != len(value):
        raise ValueError(f"a {what} is listed twice")
    return tuple(value)


def _streams(text: str) -> dict[str, tuple[str, ...]]:
    value = _json(text)
    if not isinstance(value, dict) or not value:
        raise ValueError("expected a non-empty JSON object {stream: [projection, ...]}")
    streams = {}
    for stream, projections in value.items():
        if not re.fullmatch(_NAME, stream, re.ASCII):
            raise ValueError(f"stream name {stream!r} is not an ASCII identifier")
        names = _names(projections, _PATH, "projection path")
        if not names:
            raise ValueError(f"stream {stream!r} feeds no projection")
        outputs = [p for p in names if is_output_projection(p)]
        if outputs:
            raise ValueError(f"stream {stream!r} claims {outputs[0]!r}, an output projection; a stream only "
                             "feeds the q/k/v projections")
        streams[stream] = names
    return streams


def _hosts(text: str) -> tuple[str, ...]:
    return _names(_json(text), r"[A-Za-z0-9_.:\-]{1,128}", "host name")


def _module_paths(text: str) -> tuple[str, ...]:
    paths = _names(_json(text), _PATH, "module path")
    nested = [(a, b) for a in paths for b in paths if b.startswith(a + ".")]
    if nested:
        raise ValueError(f"{nested[0][1]!r} is inside {nested[0][0]!r}; list each module once")
    return paths


def _text(limit: int) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if len(text) > limit:
            raise ValueError(f"longer than {limit} characters")
        return text

    return parse


def _dtype(text: str) -> str:
    names = sorted(dtype_name(d) for d in _FLOAT_DTYPES)
    if text not in names:
        raise ValueError(f"expected one of {names}")
    return text


_REQUIRED = object()
# field -> (parser of the stored string, default when absent or _REQUIRED). The parser raises
# ValueError saying what is expected; `validate_metadata` adds the file, field, value and fix.
_SCHEMA: dict[str, tuple[Callable[[str], Any], Any]] = {
    "format_version": (lambda t: _digits(t, 1, 10**6), _REQUIRED),
    "rank": (lambda t: _digits(t, 1, 1 << 20), _REQUIRED),
    "alpha": (_decimal, _REQUIRED),
    "use_rslora": (_boolean, _REQUIRED),
    "dropout": (_probability, 0.0),
    "streams": (_streams, _REQUIRED),
    "hosts": (_hosts, ()),
    "architecture": (_text(1024), ""),
    "base_model": (_text(4096), ""),
    "dtype": (_dtype, None),
    "model_attention_modules": (lambda t: _digits(t, 1, 10**8), None),
    "created_by": (_text(1024), ""),
    MODULES_TO_SAVE: (_module_paths, ()),
}


@dataclass(frozen=True)
class FileMetadata:
    """The validated values of a file's metadata (see the module docstring for each field)."""

    format_version: int
    rank: int
    alpha: float
    use_rslora: bool
    dropout: float
    streams: dict[str, tuple[str, ...]]
    hosts: tuple[str, ...]
    architecture: str
    base_model: str
    dtype: str | None
    model_attention_modules: int | None
    created_by: str
    modules_to_save: tuple[str, ...]

    @property
    def scaling(self) -> float:
        return scaling_rule(self.alpha, self.rank, self.use_rslora)


def _short(value: str, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'"


def _fail(path: str, message: str) -> SerialLoraFileError:
    return SerialLoraFileError(f"{path}: {message}")


def _field_error(path: str, name: str, value: str, reason: str) -> SerialLoraFileError:
    return _fail(path, f"metadata field {name!r} = {_short(value)} is invalid: {reason}; {_FIX}")


def validate_metadata(path: str, metadata: Mapping[str, str]) -> FileMetadata:
    """Every schema field of `metadata` parsed and checked, or SerialLoraFileError naming file, field,
    value and fix. Other (user) fields are kept as strings and not interpreted."""
    values: dict[str, Any] = {}
    for name, (parse, default) in _SCHEMA.items():
        text = metadata.get(name)
        if text is None:
            if default is _REQUIRED:
                raise _fail(path, f"metadata field {name!r} is missing; {_FIX}")
            values[name] = default
            continue
        try:
            values[name] = parse(text)
        except ValueError as err:
            raise _field_error(path, name, text, str(err)) from None
    info = FileMetadata(**values)
    if abs(info.scaling) > FLOAT32_MAX:
        raise _field_error(path, "alpha", metadata["alpha"], f"its scaling alpha/r = {info.scaling:.3g} is beyond "
                           f"float32 (max {FLOAT32_MAX:.3g})")
    if info.modules_to_save and info.format_version < MODULES_TO_SAVE_VERSION:
        raise _field_error(path, MODULES_TO_SAVE, metadata[MODULES_TO_SAVE],
                           f"it needs format_version >= {MODULES_TO_SAVE_VERSION}, the file says {info.format_version}")
    return info


# ------------------------------------------------------------------------------------ the file
@dataclass(frozen=True)
class StreamWeights:
    """One stream's pair as read from a file."""

    down: torch.Tensor  # A: r x d
    up: torch.Tensor  # B: d x r


@dataclass(frozen=True)
class AdapterFile:
    """A validated Serial LoRA file: weights by (attention, stream), saved modules, and its metadata.

    `metadata` holds the raw strings (user fields included); the properties read the validated `info`.
    """

    path: str
    weights: dict[tuple[str, str], StreamWeights]
    metadata: dict[str, str]
    info: FileMetadata
    modules_to_save: dict[str, torch.Tensor] = field(default_factory=dict)
    """Full tensors of saved modules by parameter/buffer path in the model (e.g. "head.weight")."""

    @property
    def format_version(self) -> int:
        return self.info.format_version

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def alpha(self) -> float:
        return self.info.alpha

    @property
    def use_rslora(self) -> bool:
        return self.info.use_rslora

    @property
    def scaling(self) -> float:
        """alpha/r (alpha/sqrt(r) with rsLoRA), from `formula.scaling`."""
        return self.info.scaling

    @property
    def dropout(self) -> float:
        return self.info.dropout

    @property
    def streams(self) -> dict[str, list[str]]:
        """stream -> the projections it feeds on the model the adapter was trained on (as the file says;
        `files.resolve_projections` decides what is adapted on a given model)."""
        return {stream: list(projections) for stream, projections in self.info.streams.items()}

    @property
    def hosts(self) -> tuple[str, ...]:
        return self.info.hosts

    @property
    def architecture(self) -> str:
        return self.info.architecture

    @property
    def base_model(self) -> str:
        return self.info.base_model

    @property
    def model_attention_modules(self) -> int | None:
        """How many attention modules the model it was saved from had (adapted or not)."""
        return self.info.model_attention_modules

    @property
    def attentions(self) -> list[str]:
        return sorted({attention for attention, _ in self.weights})

    @property
    def num_parameters(self) -> int:
        return sum(w.down.numel() + w.up.numel() for w in self.weights.values())


def _checksum(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(k for k in metadata if k != CHECKSUM_FIELD):
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
    modules_to_save: list[str] | tuple[str, ...] = (),
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The `__metadata__` of a Serial LoRA file (before its checksum)."""
    metadata = {
        FORMAT_FIELD: FORMAT_NAME,
        "format_version": str(MODULES_TO_SAVE_VERSION if modules_to_save else 1),
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
    if modules_to_save:
        metadata[MODULES_TO_SAVE] = json.dumps(list(modules_to_save))
    for key, value in (extra or {}).items():
        if key in metadata or key in _SCHEMA or key in (FORMAT_FIELD, CHECKSUM_FIELD):
            raise SerialLoraFileError(f"extra metadata key {key!r} is reserved by the file format; rename it")
        metadata[key] = str(value)
    return metadata


def _umask() -> int:
    # Read, not set-and-restore: os.umask() changes a process-wide value other threads may be using.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Write a file all-or-nothing: `write(temp_path)` fills a uniquely named temp file in the same
    folder, which is then flushed to disk and renamed over `path`.

    Readers see the old file or the new one, never a partial one; concurrent writers never share a
    temp file; a failed `write` leaves `path` as it was. The file gets mode 0666 & ~umask, like any
    file the user creates (not mkstemp's 0600). Every writer of the project uses this.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        write(os.fspath(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # `write` may have replaced the file: set the mode again
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return path


def write_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write tensors + metadata (+ checksum) with `atomic_write`."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise SerialLoraFileError(f"adapter files are .safetensors; got path {str(path)!r}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = dict(metadata)
    metadata[CHECKSUM_FIELD] = _checksum(metadata, tensors)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _read_bytes(path: str) -> bytes:
    if os.path.isdir(path):
        inside = sorted(p.name for p in Path(path).glob("*.safetensors"))[:3]
        hint = f" (it holds {inside})" if inside else ""
        raise _fail(path, f"is a directory{hint}; pass the path of the adapter's .safetensors file")
    if not os.path.isfile(path):
        raise _fail(path, "no such file" if not os.path.exists(path) else "is not a regular file; pass a .safetensors file")
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as err:  # permissions, I/O errors
        raise _fail(path, f"cannot be read ({err.strerror or err}); check the file's permissions") from None


def _parse_safetensors(path: str, data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (private copies, not a view of the file) and metadata of safetensors bytes."""
    if data[:4] == b"PK\x03\x04":
        raise _fail(path, "is a zip/pickle checkpoint (torch.save .pt/.bin/.ckpt), not safetensors; "
                    "it is never unpickled here. Re-save the adapter with save_serial_lora().")
    try:
        tensors = dict(sorted(load_safetensors(data).items()))  # sorted: the same file, the same first error
        # safetensors has already validated this header; only its metadata is read here.
        header = json.loads(data[8: 8 + struct.unpack("<Q", data[:8])[0]])
    except Exception as err:  # safetensors raises its own SafetensorError / ValueError variants
        raise _fail(path, f"is not a readable safetensors file ({type(err).__name__}: {err}); it may be "
                    "truncated, corrupt, or a pickle checkpoint (never unpickled here): re-download or re-save it") from err
    return tensors, dict(header.get("__metadata__") or {})


def _check_format(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    if metadata.get(FORMAT_FIELD) != FORMAT_NAME:
        standard = [k for k in tensors if any(m in k for m in _STANDARD_LORA_MARKERS)]
        if standard:
            raise _fail(path, f"is a standard LoRA (e.g. key {standard[0]!r}), not a Serial LoRA; "
                        "load it with your framework's LoRA loader (e.g. pipe.load_lora_weights)")
        raise _fail(path, f"is not a Serial LoRA file (metadata format={_short(metadata.get(FORMAT_FIELD))}, "
                    f"expected {FORMAT_NAME!r})")
    version = metadata.get("format_version", "")
    if not re.fullmatch(r"[0-9]{1,9}", version, re.ASCII) or int(version) < 1:
        raise _field_error(path, "format_version", version, "expected a positive integer in ASCII digits")
    if int(version) > FORMAT_VERSION:
        raise _fail(path, f"uses format version {int(version)} (metadata field 'format_version'), newer than this "
                    f"serial-lora reads ({FORMAT_VERSION}); upgrade serial-lora")
    expected = metadata.get(CHECKSUM_FIELD)
    if expected is None or expected != _checksum(metadata, tensors):
        raise _fail(path, "fails its sha256 check: the file is corrupt or was edited; re-download or re-save it")


def _check_tensor(path: str, key: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in _FLOAT_DTYPES:
        raise _fail(path, f"key {key!r} has dtype {tensor.dtype}; stored weights are float32/float16/bfloat16")
    if not torch.isfinite(tensor).all():
        raise _fail(path, f"key {key!r} contains NaN or inf values; the adapter diverged in training")


def _saved_module_path(path: str, key: str, modules: tuple[str, ...]) -> str:
    """The parameter path of a `modules_to_save.` key, which must lie in a module the metadata declares."""
    rest = key[len(MODULES_TO_SAVE) + 1:]
    for module in modules:
        name = rest[len(module) + 1:]
        if rest.startswith(module + ".") and re.fullmatch(_PATH, name, re.ASCII):
            return rest
    raise _fail(path, f"key {key!r} is not in a module that metadata field {MODULES_TO_SAVE!r} lists ({list(modules)}); {_FIX}")


def read_file(path: str | os.PathLike) -> AdapterFile:
    """Read and validate a Serial LoRA file on its own (the model is not involved yet)."""
    path = os.fspath(path)
    tensors, metadata = _parse_safetensors(path, _read_bytes(path))
    _check_format(path, tensors, metadata)
    info = validate_metadata(path, metadata)

    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key.startswith(MODULES_TO_SAVE + ".") and info.modules_to_save:
            _check_tensor(path, key, tensor)
            saved[_saved_module_path(path, key, info.modules_to_save)] = tensor
            continue
        parsed = parse_key(key)
        if parsed is None:
            raise _fail(path, f"has an unexpected key {_short(key)}; Serial LoRA keys look like "
                        f"'<attention>.serial_lora.<stream>.down.weight' or '{MODULES_TO_SAVE}.<module>.<tensor>'")
        attention, stream, part = parsed
        if stream not in info.streams:
            raise _fail(path, f"key {key!r} names stream {stream!r}, which metadata field 'streams' does not "
                        f"declare ({sorted(info.streams)})")
        _check_tensor(path, key, tensor)
        if tensor.dim() != 2:
            raise _fail(path, f"key {key!r} has shape {tuple(tensor.shape)}; expected a matrix")
        parts.setdefault((attention, stream), {})[part] = tensor

    weights = {}
    for (attention, stream), pair in sorted(parts.items()):
        for part in ("down", "up"):
            if part not in pair:
                raise _fail(path, f"key {adapter_key(attention, stream, part)!r} is missing "
                            f"(its pair {adapter_key(attention, stream, 'up' if part == 'down' else 'down')!r} is present)")
        down, up = pair["down"], pair["up"]
        if down.shape[0] != info.rank or up.shape[1] != info.rank or up.shape[0] != down.shape[1]:
            raise _fail(path, f"{adapter_key(attention, stream, 'down')!r} has shape {tuple(down.shape)} and "
                        f"{adapter_key(attention, stream, 'up')!r} has shape {tuple(up.shape)}; expected "
                        f"(r, d) and (d, r) with r = metadata field 'rank' = {info.rank}")
        weights[(attention, stream)] = StreamWeights(down=down, up=up)
    if not weights:
        raise _fail(path, "contains no adapter weights")
    unused = sorted(set(info.streams) - {stream for _, stream in weights})
    if unused:
        raise _field_error(path, "streams", metadata["streams"], f"stream {unused[0]!r} has no weights in the file")
    empty = [m for m in info.modules_to_save if not any(p.startswith(m + ".") for p in saved)]
    if empty:
        raise _field_error(path, MODULES_TO_SAVE, metadata[MODULES_TO_SAVE], f"module {empty[0]!r} has no tensors in the file")
    if info.model_attention_modules is not None and info.model_attention_modules < len({a for a, _ in weights}):
        raise _field_error(path, "model_attention_modules", metadata["model_attention_modules"],
                           f"the file adapts {len({a for a, _ in weights})} attention modules, more than that")
    if info.dtype is not None and info.dtype not in {dtype_name(t.dtype) for pair in weights.values() for t in (pair.down, pair.up)}:
        raise _field_error(path, "dtype", metadata["dtype"], "no adapter weight has that dtype")
    return AdapterFile(path=path, weights=weights, metadata=dict(metadata), info=info, modules_to_save=saved)
