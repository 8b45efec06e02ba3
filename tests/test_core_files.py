"""Adapter files: save/load round trips, every kind of bad file (model left exactly as it was),
random corruptions (hypothesis), and atomic writes."""

from __future__ import annotations

import collections
import copy
import json
import os
import struct
from pathlib import Path
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import serial_lora_core.format as format_module
from core_models import (
    ARCHITECTURE,
    DTYPES,
    HOSTS,
    FileContext,
    file_tensors,
    source_model,
    target_model,
    assert_unchanged,
    host_registered,
    randomize_adapters,
    run,
    same_bits,
    snapshot,
)
from serial_lora_core import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SerialLoraConfig,
    SerialLoraFileError,
    adapter_config,
    adapter_names,
    inject_serial_lora,
    load_serial_lora,
    merge_serial_lora,
    read_file,
    save_serial_lora,
    serial_lora_state_dict,
    set_serial_lora_scale,
)

# ------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_round_trip_into_a_fresh_model(case, dtype, tmp_path):
    source = source_model(case, dtype, use_rslora=True)
    inputs = case.inputs("BHWC", dtype)
    expected = run(source, inputs)
    path = save_serial_lora(source, tmp_path / "adapter.safetensors", base_model="org/tiny")
    assert path == tmp_path / "adapter.safetensors"
    assert os.listdir(tmp_path) == ["adapter.safetensors"]

    target = target_model(case, dtype)
    assert not torch.equal(run(target, inputs), expected)
    loaded = load_serial_lora(target, path)
    assert torch.equal(run(target, inputs), expected)
    ours, theirs = serial_lora_state_dict(target), serial_lora_state_dict(source)
    assert list(ours) == list(theirs)
    assert all(same_bits(ours[k], theirs[k]) for k in ours)
    config = adapter_config(target)
    assert (config.rank, config.alpha, config.use_rslora, config.scaling) == (4, 6.0, True, 3.0)
    assert loaded.rank == 4 and loaded.alpha == 6.0 and loaded.scaling == 3.0
    assert not any(p.requires_grad for p in ours.values())  # loaded for inference by default


def test_file_layout_and_metadata(case, tmp_path):
    source = source_model(case, torch.bfloat16, dropout=0.1)
    path = save_serial_lora(source, tmp_path / "a.safetensors", base_model="org/tiny", dtype=torch.float32,
                            metadata={"trigger": "sks"})
    tensors, metadata = file_tensors(path)
    expected_keys = {f"blocks.{i}.attn.serial_lora.{stream}.{part}.weight"
                     for i in range(2) for stream in case.streams for part in ("down", "up")}
    assert set(tensors) == expected_keys
    assert not any(marker in key for key in tensors for marker in ("lora_A", "lora_B", "lora_up", "lora_down", "default"))
    for key, tensor in tensors.items():
        stream = key.split(".")[-3]
        features = case.streams[stream][1]
        assert tensor.dtype == torch.float32
        assert tuple(tensor.shape) == ((4, features) if ".down." in key else (features, 4))
    assert metadata["format"] == FORMAT_NAME == "serial_lora"
    assert metadata["format_version"] == "1"  # version 2 only for files that use modules_to_save
    assert (metadata["rank"], float(metadata["alpha"]), metadata["use_rslora"]) == ("4", 6.0, "false")
    assert float(metadata["dropout"]) == 0.1
    assert json.loads(metadata["streams"]) == {s: list(p) for s, (p, _) in case.streams.items()}
    assert metadata["architecture"] == ARCHITECTURE
    assert metadata["base_model"] == "org/tiny"
    assert metadata["dtype"] == "float32"
    assert metadata["model_attention_modules"] == "2"
    assert metadata["trigger"] == "sks"
    assert len(metadata["sha256"]) == 64
    adapter = read_file(path)
    assert adapter.architecture == ARCHITECTURE
    assert adapter.attentions == ["blocks.0.attn", "blocks.1.attn"]
    assert adapter.num_parameters == sum(t.numel() for t in tensors.values())


def test_load_into_a_model_that_already_has_the_adapter(case, tmp_path):
    source = source_model(case)
    inputs = case.inputs()
    path = save_serial_lora(source, tmp_path / "a.safetensors")
    target = target_model(case)
    inject_serial_lora(target, SerialLoraConfig(rank=4))
    randomize_adapters(target, seed=99)
    assert not torch.equal(run(target, inputs), run(source, inputs))
    load_serial_lora(target, path, trainable=True)
    assert adapter_names(target) == ["default"]
    assert adapter_config(target).alpha == 6.0  # the file's alpha replaces the existing adapter's
    assert torch.equal(run(target, inputs), run(source, inputs))
    assert all(p.requires_grad for p in serial_lora_state_dict(target).values())


def test_load_into_an_adapter_whose_scale_times_the_files_scaling_overflows_is_refused(tmp_path):
    # The existing adapter keeps its scale (1e37) and would take the file's scaling (400/4 = 100):
    # 1e39 is beyond float32, and the first forward used to crash ("cannot be converted ... overflow").
    case = HOSTS["fused"]
    path = save_serial_lora(source_model(case, alpha=400.0), tmp_path / "large_alpha.safetensors")
    target = source_model(case)
    set_serial_lora_scale(target, 1e37)
    before = snapshot(target)
    with pytest.raises(SerialLoraFileError, match=r"scale 1e\+37, which times the file's scaling 100") as error:
        load_serial_lora(target, path)
    assert "large_alpha.safetensors" in str(error.value)
    assert_unchanged(target, before)
    set_serial_lora_scale(target, 1.0)
    load_serial_lora(target, path)
    assert torch.isfinite(run(target, case.inputs())).all()


def test_load_under_a_second_adapter_name(case, tmp_path):
    source = source_model(case)
    inputs = case.inputs()
    path = save_serial_lora(source, tmp_path / "a.safetensors")
    target = target_model(case)
    inject_serial_lora(target, SerialLoraConfig(rank=2))
    randomize_adapters(target, seed=7)
    load_serial_lora(target, path, adapter_name="style")
    assert adapter_names(target) == ["default", "style"]
    assert not torch.equal(run(target, inputs), run(source, inputs))
    set_serial_lora_scale(target, 0.0, "default")
    assert torch.equal(run(target, inputs), run(source, inputs))
    # And it saves back under its own name to the same file content.
    again = save_serial_lora(target, tmp_path / "b.safetensors", adapter_name="style")
    assert file_tensors(again)[0].keys() == file_tensors(path)[0].keys()
    assert all(same_bits(a, b) for a, b in zip(file_tensors(again)[0].values(), file_tensors(path)[0].values()))


def test_partial_file_loads_only_its_attention_modules(tmp_path):
    case = HOSTS["split"]
    source = target_model(case)
    inject_serial_lora(source, SerialLoraConfig(rank=2, target_modules=r"blocks\.1\."))
    randomize_adapters(source, seed=1)
    path = save_serial_lora(source, tmp_path / "a.safetensors")
    target = target_model(case)
    load_serial_lora(target, path)
    assert not hasattr(target.blocks[0].attn, "serial_lora")
    assert torch.equal(run(target, case.inputs()), run(source, case.inputs()))


# ------------------------------------------------------------------------------------ bad files
def _other_model_file(ctx: FileContext, case: str, architecture: str, **model_kwargs) -> Path:
    with host_registered(HOSTS[case]):
        model = source_model(HOSTS[case], architecture=architecture, model_kwargs=model_kwargs)
    return save_serial_lora(model, ctx.folder / f"other_{case}.safetensors")


def _without(ctx: FileContext, *keys: str) -> dict:
    return {k: v for k, v in ctx.tensors.items() if k not in keys}


K0 = "blocks.0.attn.serial_lora.input"
K1 = "blocks.1.attn.serial_lora.input"


class Unpicklable:
    """Unpickling this writes a marker file: proof that a loader executed pickle code."""

    marker = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "unpickled"))


def _torch_save(ctx: FileContext, zipfile: bool) -> Path:
    Unpicklable.marker = str(ctx.folder / "UNPICKLED")
    path = ctx.folder / ("adapter.pt" if zipfile else "legacy.bin")
    torch.save({"payload": Unpicklable(), **ctx.tensors}, path, _use_new_zipfile_serialization=zipfile)
    return path


# name -> (make the bad file, target model state, substrings the message must contain)
BAD_FILES: dict[str, tuple[Callable[[FileContext], Path], str, tuple[str, ...]]] = {
    "other_width": (lambda c: _other_model_file(c, "fused", "tiny_vit_w24", dim=24),
                    "fresh", (f"{K0}.down.weight", "(4, 24)", "(4, 16)", "tiny_vit_w24", ARCHITECTURE)),
    "other_depth": (lambda c: _other_model_file(c, "fused", "tiny_vit_d3", depth=3),
                    "fresh", ("3 attention modules of width 16", "has 2 of width 16", "tiny_vit_d3", ARCHITECTURE)),
    # The same architecture name on both sides: the message says what differs, not the name twice.
    "other_depth_same_name": (lambda c: _other_model_file(c, "fused", ARCHITECTURE, depth=3), "fresh",
                              ("3 attention modules of width 16", "this model has 2 of width 16",
                               f"both {ARCHITECTURE!r}", "different sizes")),
    "other_width_same_name": (lambda c: _other_model_file(c, "fused", ARCHITECTURE, dim=24), "fresh",
                              (f"{K0}.down.weight", "(4, 24)", "16 features", f"both {ARCHITECTURE!r}")),
    "other_host": (lambda c: _other_model_file(c, "joint", "tiny_sd3"),
                   "fresh", ("blocks.0.attn.serial_lora.image.down.weight", "'image'", "tiny_sd3", ARCHITECTURE)),
    "rank_vs_metadata": (lambda c: c.rewrite(rank="3"), "fresh", (f"{K0}.down.weight", "(4, 16)", "(16, 4)", "'rank' = 3")),
    "missing_up_of_a_pair": (lambda c: c.rewrite(_without(c, f"{K1}.up.weight")), "fresh",
                             (f"{K1}.up.weight", "missing", f"{K1}.down.weight")),
    "missing_down_of_a_pair": (lambda c: c.rewrite(_without(c, f"{K0}.down.weight")), "fresh",
                               (f"{K0}.down.weight", "missing", f"{K0}.up.weight")),
    "missing_attention_vs_model_adapter": (lambda c: c.rewrite(_without(c, f"{K1}.up.weight", f"{K1}.down.weight")),
                                           "with_adapter", (f"{K1}.down.weight", "lacks")),
    "rank_vs_model_adapter": (lambda c: Path(c.good), "with_rank2_adapter", (f"{K0}.down.weight", "rank 2", "rank 4")),
    "extra_unknown_key": (lambda c: c.rewrite({**c.tensors, "blocks.0.attn.extra.weight": torch.zeros(2, 2)}),
                          "fresh", ("'blocks.0.attn.extra.weight'", "unexpected key")),
    "extra_attention_key": (lambda c: c.rewrite({**c.tensors, "blocks.7.attn.serial_lora.input.down.weight": torch.zeros(4, 16),
                                                 "blocks.7.attn.serial_lora.input.up.weight": torch.zeros(16, 4)},
                                                c.metadata_without("model_attention_modules")),
                            "fresh", ("blocks.7.attn.serial_lora.input.down.weight", "'blocks.7.attn'", "does not have")),
    "key_on_a_non_attention": (lambda c: c.rewrite({**c.tensors, "head.serial_lora.input.down.weight": torch.zeros(4, 16),
                                                    "head.serial_lora.input.up.weight": torch.zeros(16, 4)},
                                                   c.metadata_without("model_attention_modules")),
                               "fresh", ("head.serial_lora.input.down.weight", "not an attention module")),
    "undeclared_stream": (lambda c: c.rewrite({**c.tensors, f"{K0[:-5]}text.down.weight": torch.zeros(4, 16)}),
                          "fresh", ("blocks.0.attn.serial_lora.text.down.weight", "'text'")),
    "nan_weights": (lambda c: c.rewrite({**c.tensors, f"{K1}.up.weight": c.tensors[f"{K1}.up.weight"].index_fill(0, torch.tensor([3]), float("nan"))}),
                    "fresh", (f"{K1}.up.weight", "NaN or inf")),
    "inf_weights": (lambda c: c.rewrite({**c.tensors, f"{K0}.down.weight": c.tensors[f"{K0}.down.weight"] / 0.0}),
                    "fresh", (f"{K0}.down.weight", "NaN or inf")),
    "integer_weights": (lambda c: c.rewrite({**c.tensors, f"{K0}.down.weight": torch.ones(4, 16, dtype=torch.int32)}),
                        "fresh", (f"{K0}.down.weight", "torch.int32")),
    "three_dim_weights": (lambda c: c.rewrite({**c.tensors, f"{K0}.down.weight": torch.ones(4, 16, 1)}),
                          "fresh", (f"{K0}.down.weight", "(4, 16, 1)", "matrix")),
    "no_weights": (lambda c: c.rewrite({}), "fresh", ("no adapter weights",)),
    "truncated": (lambda c: c.raw(c.good.read_bytes()[: len(c.good.read_bytes()) * 2 // 3]), "fresh", ("not a readable safetensors",)),
    "empty": (lambda c: c.raw(b""), "fresh", ("not a readable safetensors",)),
    "not_safetensors": (lambda c: c.raw(b"GIF89a this is not an adapter" * 8), "fresh", ("not a readable safetensors",)),
    "torch_save_zip": (lambda c: _torch_save(c, zipfile=True), "fresh", ("zip/pickle", "never unpickled")),
    "torch_save_legacy_pickle": (lambda c: _torch_save(c, zipfile=False), "fresh", ("not a readable safetensors", "never unpickled")),
    "standard_lora": (lambda c: _standard_lora(c), "fresh", ("standard LoRA", "lora_A")),
    "wrong_format_name": (lambda c: c.rewrite(format="kohya_lora"), "fresh", ("'kohya_lora'", "'serial_lora'")),
    "no_metadata": (lambda c: _plain_safetensors(c), "fresh", ("not a Serial LoRA file", "None")),
    "newer_format_version": (lambda c: c.rewrite(format_version=str(FORMAT_VERSION + 1)), "fresh", (f"format version {FORMAT_VERSION + 1}", "upgrade")),
    "invalid_format_version": (lambda c: c.rewrite(format_version="one"), "fresh", ("format_version", "'one'")),
    "invalid_metadata_value": (lambda c: c.rewrite(use_rslora="maybe"), "fresh", ("metadata field 'use_rslora'", "'maybe'", "'true' or 'false'")),
    "invalid_streams_json": (lambda c: c.rewrite(streams="{input"), "fresh", ("metadata field 'streams'", "'{input'", "not valid JSON")),
    "edited_metadata": (lambda c: _edited(c, alpha="600.0"), "fresh", ("sha256",)),
    "edited_weights": (lambda c: _edited(c, tensors={**c.tensors, f"{K0}.up.weight": c.tensors[f"{K0}.up.weight"] * 2}), "fresh", ("sha256",)),
    "checksum_removed": (lambda c: _edited(c, sha256=None), "fresh", ("sha256",)),
    "no_such_file": (lambda c: c.folder / "missing.safetensors", "fresh", ("no such file", "missing.safetensors")),
    "while_merged": (lambda c: Path(c.good), "merged", ("merged", "unmerge_serial_lora")),
}


def _standard_lora(ctx: FileContext) -> Path:
    path = ctx.folder / "standard.safetensors"
    save_file({"blocks.0.attn.qkv.lora_A.weight": torch.zeros(4, 16), "blocks.0.attn.qkv.lora_B.weight": torch.zeros(48, 4)},
              path, metadata={"format": "pt"})
    return path


def _plain_safetensors(ctx: FileContext) -> Path:
    path = ctx.folder / "plain.safetensors"
    save_file(ctx.tensors, path)
    return path


def _edited(ctx: FileContext, tensors=None, **changes) -> Path:
    """Edit metadata or weights but keep the old checksum (what a hand-edited file looks like)."""
    metadata = {**ctx.metadata, **changes}
    metadata = {k: v for k, v in metadata.items() if v is not None}
    path = ctx.folder / "edited.safetensors"
    save_file(tensors if tensors is not None else ctx.tensors, path, metadata=metadata)
    return path


def _target_for(state: str, tmp_path) -> torch.nn.Module:
    model = target_model(HOSTS["fused"])
    if state in ("with_adapter", "merged"):
        inject_serial_lora(model, SerialLoraConfig(rank=4))
        randomize_adapters(model, seed=21)
    if state == "with_rank2_adapter":
        inject_serial_lora(model, SerialLoraConfig(rank=2))
    if state == "merged":
        merge_serial_lora(model)
    return model


@pytest.mark.parametrize("bad", list(BAD_FILES))
def test_bad_file_raises_and_leaves_the_model_unchanged(bad, context, tmp_path):
    make, state, expected = BAD_FILES[bad]
    path = make(context)
    model = _target_for(state, tmp_path)
    inputs = HOSTS["fused"].inputs()
    before = snapshot(model)
    output = run(model, inputs)
    with pytest.raises(SerialLoraFileError) as error:
        load_serial_lora(model, path)
    message = str(error.value)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    assert_unchanged(model, before)
    assert torch.equal(run(model, inputs), output)
    assert not (context.folder / "UNPICKLED").exists()


@pytest.mark.parametrize("bad", ["truncated", "torch_save_zip", "standard_lora", "newer_format_version", "edited_metadata", "nan_weights"])
def test_read_file_alone_rejects_bad_files(bad, context):
    path = BAD_FILES[bad][0](context)
    with pytest.raises(SerialLoraFileError, match=str(path.name).replace(".", r"\.")):
        read_file(path)
    assert not (context.folder / "UNPICKLED").exists()


def test_architecture_mismatch_with_matching_shapes_loads_with_a_warning(context):
    model = target_model(HOSTS["fused"], architecture="another_vit")
    with pytest.warns(UserWarning, match=f"trained on '{ARCHITECTURE}', loaded into 'another_vit'"):
        load_serial_lora(model, context.good)
    assert adapter_names(model) == ["default"]


# ------------------------------------------------------------------------------------ save errors
def test_save_refuses_bad_paths_and_reserved_metadata(tmp_path):
    source = source_model(HOSTS["fused"])
    with pytest.raises(SerialLoraFileError, match="adapter.pt"):
        save_serial_lora(source, tmp_path / "adapter.pt")
    with pytest.raises(SerialLoraFileError, match="'rank'"):
        save_serial_lora(source, tmp_path / "a.safetensors", metadata={"rank": "8"})
    with pytest.raises(SerialLoraFileError, match="'missing'"):
        save_serial_lora(source, tmp_path / "a.safetensors", adapter_name="missing")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("existing", [True, False], ids=["over_existing_file", "new_file"])
def test_failed_save_is_atomic(existing, tmp_path, monkeypatch):
    source = source_model(HOSTS["fused"])
    path = tmp_path / "adapter.safetensors"
    if existing:
        save_serial_lora(source_model(HOSTS["fused"], seed=1), path)
    before = path.read_bytes() if existing else None

    def half_written(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(format_module, "save_file", half_written)
    with pytest.raises(OSError, match="No space left"):
        save_serial_lora(source, path)
    assert sorted(os.listdir(tmp_path)) == (["adapter.safetensors"] if existing else [])
    if existing:
        assert path.read_bytes() == before
        read_file(path)  # still a valid file


# ------------------------------------------------------------------------------------ hypothesis
def _header_end(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


@st.composite
def corruptions(draw, data: bytes) -> tuple[str, bytes]:
    """One random corruption of `data`; positions favour the header, where parsing happens."""
    size, header_end = len(data), _header_end(data)
    position = st.one_of(st.integers(0, size - 1), st.integers(0, header_end - 1), st.integers(0, 15))
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "prepend", "append", "header_length", "whitespace"]))
    if kind == "truncate":
        return kind, data[: draw(st.one_of(st.integers(0, size - 1), st.integers(max(0, header_end - 4), header_end + 4)))]
    if kind == "flip":
        out = bytearray(data)
        for index, mask in draw(st.lists(st.tuples(position, st.integers(1, 255)), min_size=1, max_size=8)):
            out[index] ^= mask
        return kind, bytes(out)
    if kind == "overwrite":
        start = draw(position)
        chunk = draw(st.one_of(st.binary(min_size=1, max_size=64), st.sampled_from([b"{}", b'"', b"\x00" * 8, b"]", b"NaN", b"-1"])))
        return kind, data[:start] + chunk + data[start + len(chunk):]
    if kind == "prepend":
        return kind, draw(st.binary(min_size=1, max_size=64)) + data
    if kind == "append":
        return kind, data + draw(st.binary(min_size=1, max_size=64))
    if kind == "header_length":
        length = header_end - 8
        value = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(max(0, length - 16), length + 16), st.sampled_from([0, 1, 2**63, size])))
        return kind, struct.pack("<Q", value) + data[8:]
    # JSON whitespace in the header's padding: a harmless change the loader must accept.
    padding = [i for i in range(8, header_end) if data[i] == 0x20]
    out = bytearray(data)
    for index in draw(st.lists(st.sampled_from(padding), min_size=1, max_size=4)):
        out[index] = draw(st.sampled_from(b" \t\n\r"))
    return kind, bytes(out)


def test_random_corruptions_raise_or_load_identically(tmp_path):
    case = HOSTS["split"]
    source = source_model(case)
    good = save_serial_lora(source, tmp_path / "good.safetensors")
    original = read_file(good)
    data = good.read_bytes()
    pristine = target_model(case)
    inputs = case.inputs()
    expected_output = run(source, inputs)
    corrupt = tmp_path / "corrupt.safetensors"
    outcomes = collections.Counter()

    @settings(max_examples=500, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(corruptions(data))
    def check(corruption):
        kind, corrupted = corruption
        corrupt.write_bytes(corrupted)
        model = copy.deepcopy(pristine)
        before = snapshot(model)
        try:
            loaded = load_serial_lora(model, corrupt)
        except SerialLoraFileError as error:
            assert str(corrupt) in str(error)
            assert_unchanged(model, before)
            outcomes["error"] += 1
            return
        # Only a semantically identical file may load, and then it is the original adapter.
        assert loaded.metadata == original.metadata
        assert loaded.weights.keys() == original.weights.keys()
        for key, pair in original.weights.items():
            assert same_bits(loaded.weights[key].down, pair.down) and same_bits(loaded.weights[key].up, pair.up)
        assert torch.equal(run(model, inputs), expected_output)
        outcomes[f"identical:{kind}"] += 1

    check()
    assert outcomes["error"] >= 200, outcomes
    assert sum(v for k, v in outcomes.items() if k.startswith("identical")) >= 1, outcomes


def test_load_options_trainable_and_dtype(tmp_path):
    case = HOSTS["joint"]
    source = source_model(case, dropout=0.2)
    path = save_serial_lora(source, tmp_path / "a.safetensors", dtype=torch.bfloat16)
    inference = target_model(case)
    load_serial_lora(inference, path, dtype=torch.bfloat16)
    weights = serial_lora_state_dict(inference)
    assert all(w.dtype == torch.bfloat16 and not w.requires_grad for w in weights.values())
    assert adapter_config(inference).dropout == 0.0
    training = target_model(case)
    load_serial_lora(training, path, trainable=True)
    weights = serial_lora_state_dict(training)
    assert all(w.dtype == torch.float32 and w.requires_grad for w in weights.values())
    assert adapter_config(training).dropout == 0.2
    stored = {k: v.float() for k, v in file_tensors(path)[0].items()}
    assert all(torch.equal(weights[k], stored[k]) for k in stored)


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.head.weight.data.view(-1)[0].add_(1e-3),
        lambda m: m.blocks[0].norm1.weight.requires_grad_(False),
        lambda m: m.blocks[0].attn.qkv.register_forward_pre_hook(lambda *a: None),
        lambda m: m.blocks[1].attn.register_forward_hook(lambda *a: None),
        lambda m: m.blocks[0].add_module("extra", torch.nn.Identity()),
        lambda m: m.blocks[0].train(),
        lambda m: inject_serial_lora(m, SerialLoraConfig(rank=2)),
    ],
    ids=["weight", "requires_grad", "projection_hook", "attention_hook", "module", "mode", "adapter"],
)
def test_snapshot_helper_detects_every_kind_of_change(change):
    model = target_model(HOSTS["fused"])
    before = snapshot(model)
    assert_unchanged(model, before)
    change(model)
    with pytest.raises(AssertionError):
        assert_unchanged(model, before)


def test_round_trip_when_the_model_itself_is_the_attention(tmp_path):
    torch.manual_seed(0)
    attention = HOSTS["split"].build().blocks[0].attn
    inject_serial_lora(attention, SerialLoraConfig(rank=2))
    randomize_adapters(attention, seed=5)
    path = save_serial_lora(attention, tmp_path / "bare.safetensors")
    assert set(file_tensors(path)[0]) == {"serial_lora.input.down.weight", "serial_lora.input.up.weight"}
    torch.manual_seed(0)
    fresh = HOSTS["split"].build().blocks[0].attn
    load_serial_lora(fresh, path)
    (x,) = HOSTS["split"].inputs()
    assert torch.equal(run(fresh, (x,)), run(attention, (x,)))
