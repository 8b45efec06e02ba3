"""The file schema: keys matched exactly, every metadata field validated (file, field, value and fix
named; `serial-lora info` exits 2 with one line), and one rule for which projections a file adapts."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from comfyui_nodes.keymap import plan_patches
from core_models import HOSTS, assert_unchanged, base_weights_file, run, snapshot, target_model
from serial_lora_core import SerialLoraError, SerialLoraFileError, equivalent_lora, load_serial_lora, read_file
from serial_lora_core.cli import main
from serial_lora_core.files import resolve_projections
from serial_lora_core.format import OUTPUT_PROJECTIONS, parse_key
from serial_lora_core.hosts import match_host

K0 = "blocks.0.attn.serial_lora.input"


# ------------------------------------------------------------------------------------ keys
@pytest.mark.parametrize(
    "key",
    [f"{K0}.up.weight\n", f"{K0}.up.weight ", f" {K0}.up.weight", f"{K0}.up.weight\x00", f"{K0}.up.weights",
     f"blocks.0.attn.serial_lora.input.serial_lora.input.up.weight", f"blocks.٠.attn.serial_lora.input.up.weight",
     "blocks.0.attn.serial_lora.inpüt.up.weight", "blocks..0.attn.serial_lora.input.up.weight",
     ".serial_lora.input.up.weight", "serial_lora.input.up.weight.extra", "modules_to_save.head.weight"],
    ids=["trailing_newline", "trailing_space", "leading_space", "nul", "plural", "nested_slot", "arabic_digit",
         "non_ascii_stream", "empty_segment", "leading_dot", "suffix", "v2_key_in_v1_file"],
)
def test_a_key_that_is_not_exactly_one_adapter_slot_is_refused(key, context):
    assert parse_key(key) is None
    # Next to the real tensor (the trailing-newline key used to silently replace it).
    tensors = {**context.tensors, key: torch.zeros_like(context.tensors[f"{K0}.up.weight"])}
    path = context.rewrite(tensors)
    with pytest.raises(SerialLoraFileError) as error:
        read_file(path)
    assert str(path) in str(error.value) and repr(key)[1:-1] in str(error.value)
    assert "unexpected key" in str(error.value)


def test_parse_key_accepts_exact_slots():
    assert parse_key(f"{K0}.down.weight") == ("blocks.0.attn", "input", "down")
    assert parse_key("serial_lora.text.up.weight") == ("", "text", "up")
    assert parse_key("transformer_blocks.11.attn2.serial_lora.image.up.weight") == ("transformer_blocks.11.attn2", "image", "up")


# ------------------------------------------------------------------------------------ metadata
# field -> bad values; each must be refused naming the file, the field and the value.
BAD_METADATA: dict[str, list[str]] = {
    "format_version": ["1.0", "²", "0", "-1", "", "1 "],
    "rank": ["0", "4.0", "٤", "²", "-4", "four", "99999999999"],
    "alpha": ["1e300", "nan", "inf", "-inf", "1_0", " 6.0", "6,0", "0x10", ""],
    "use_rslora": ["True", "1", "yes", ""],
    "dropout": ["abc", "nan", "2.0", "1.0", "-0.1", "inf"],
    "streams": ['{"input": 5}', '{"input": []}', "[]", "{}", '{"input": ["proj"]}', '{"input": ["blocks.0.attn.to_out.0"]}',
                '{"in put": ["qkv"]}', '{"input": ["qkv", "qkv"]}', '{"input": ["qkv"], "input": ["qkv"]}',
                "[" * 100000, '{"input": [1]}', "{input", '{"input": ["qkv"], "text": ["add_q_proj"]}'],
    "hosts": ["{not json", "[1]", '["a", "a"]', '"fused_qkv"', '["fused qkv"]'],
    "dtype": ["int8", "torch.float32", "float16"],
    "model_attention_modules": ["²", "0", "-2", "1", "2.0", "many"],
    "architecture": ["x" * 2000],
    "created_by": ["y" * 2000],
    "modules_to_save": ['["head"]'],
}
CASES = [(field, value) for field, values in BAD_METADATA.items() for value in values]


@pytest.mark.parametrize("field, value", CASES, ids=[f"{f}={v[:12]!r}" for f, v in CASES])
def test_every_metadata_field_is_validated(field, value, context, capsys):
    path = context.rewrite(**{field: value})
    with pytest.raises(SerialLoraFileError) as error:
        read_file(path)
    message = str(error.value)
    assert str(path) in message and f"'{field}'" in message, message
    assert repr(value)[1:20] in message, message
    if field != "format_version":  # (a version problem's fix is the version, not a re-save)
        assert "save_serial_lora" in message
    # The command line reports it the same way: exit 2, one line, no traceback.
    assert main(["info", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith("serial-lora: error: ") and f"'{field}'" in captured.err


@pytest.mark.parametrize("field", ["rank", "alpha", "use_rslora", "streams"])
def test_a_missing_required_field_is_named(field, context):
    path = context.rewrite(metadata=context.metadata_without(field))
    with pytest.raises(SerialLoraFileError, match=f"metadata field '{field}' is missing"):
        read_file(path)


def test_alpha_beyond_float32_is_refused_naming_the_value_and_the_model_is_unchanged(context):
    path = context.rewrite(alpha="1e300")
    model = target_model(HOSTS["fused"])
    before = snapshot(model)
    with pytest.raises(SerialLoraFileError, match=r"'alpha' = '1e300'.*beyond float32"):
        load_serial_lora(model, path)
    assert_unchanged(model, before)


def test_properties_read_validated_values(context):
    path = context.rewrite(dropout="0.25", hosts='["fused_qkv"]', base_model="org/tiny")
    adapter = read_file(path)
    assert (adapter.rank, adapter.alpha, adapter.use_rslora, adapter.dropout) == (4, 6.0, False, 0.25)
    assert adapter.scaling == 1.5 and adapter.format_version == 1
    assert adapter.streams == {"input": ["qkv"]} and adapter.hosts == ("fused_qkv",)
    assert adapter.model_attention_modules == 2 and adapter.base_model == "org/tiny"
    # Optional fields may be absent (files of other writers): defaults, not errors.
    minimal = read_file(context.rewrite(metadata=context.metadata_without("dropout", "hosts", "dtype", "model_attention_modules",
                                                                  "architecture", "base_model", "created_by")))
    assert (minimal.dropout, minimal.hosts, minimal.model_attention_modules, minimal.architecture) == (0.0, (), None, "")


def test_unknown_user_metadata_is_kept_verbatim(context):
    adapter = read_file(context.rewrite(trigger="sks \x1b[31m"))
    assert adapter.metadata["trigger"] == "sks \x1b[31m"


# ------------------------------------------------------------------------------------ one resolution rule
@pytest.mark.parametrize("projection", sorted(OUTPUT_PROJECTIONS))
def test_a_stream_claiming_an_output_projection_is_refused_everywhere(projection, context, tmp_path, capsys):
    """The attack of issue 10 item 3: `streams` re-hashed to the output projection."""
    path = context.rewrite(streams=json.dumps({"input": [projection]}))
    with pytest.raises(SerialLoraFileError, match=rf"'streams'.*{projection!r}.*output projection"):
        read_file(path)
    model = target_model(HOSTS["fused"])
    before = snapshot(model)
    with pytest.raises(SerialLoraFileError):
        load_serial_lora(model, path)
    assert_unchanged(model, before)
    out = tmp_path / "out.safetensors"
    assert main(["export-lora", str(path), str(out), "--base", str(base_weights_file(HOSTS["fused"], tmp_path))]) == 2
    assert "output projection" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(
    "hosts, without_model, info_exit",
    [('["fused_qkv"]', r"'streams' says stream 'input' feeds \['q_proj', 'k_proj', 'v_proj'\], but its host 'fused_qkv'", 2),
     ('["not_registered_here"]', "blocks.0.attn.q_proj.weight", 0)],
    ids=["known_host", "unknown_host"],
)
def test_streams_that_contradict_the_host_are_refused_by_every_consumer(hosts, without_model, info_exit, context, tmp_path, capsys):
    # Not an output projection, but not what a fused-qkv attention has either.
    path = context.rewrite(streams=json.dumps({"input": ["q_proj", "k_proj", "v_proj"]}), hosts=hosts)
    adapter = read_file(path)
    model = target_model(HOSTS["fused"])
    before, output = snapshot(model), run(model, HOSTS["fused"].inputs())
    with pytest.raises(SerialLoraFileError, match=r"'streams' says stream 'input' feeds \['q_proj', 'k_proj', 'v_proj'\], "
                       r"but on this model 'blocks.0.attn' feeds it to \['qkv'\]"):
        load_serial_lora(model, path)
    assert_unchanged(model, before)
    assert torch.equal(run(model, HOSTS["fused"].inputs()), output)
    # Without a model: refused by the file's host when it is known here, else by the base weights.
    base = base_weights_file(HOSTS["fused"], tmp_path)
    assert main(["export-lora", str(path), str(tmp_path / "o.safetensors"), "--base", str(base)]) == 2
    assert re.search(without_model, capsys.readouterr().err)
    with pytest.raises(SerialLoraError, match=without_model):
        equivalent_lora(adapter, dict(HOSTS["fused"].model().state_dict()))
    # ComfyUI's plan asks the same function, so it never patches what the core would not.
    state = HOSTS["fused"].model().state_dict()
    key_map = {k.removesuffix(".weight"): k for k in state if k.endswith(".weight")}
    with pytest.raises(SerialLoraError, match="says stream|match nothing"):
        plan_patches(adapter, [("model", key_map, ("",), {k: v.shape for k, v in state.items()})])
    assert main(["info", str(path)]) == info_exit


def test_a_file_naming_no_known_host_cannot_point_the_export_at_another_layer(context, tmp_path, capsys):
    # Re-hashed: no host named, and a stream that "feeds" a layer no attention host reads through an adapter.
    path = context.rewrite(streams=json.dumps({"input": ["norm1"]}), hosts="[]")
    adapter = read_file(path)
    with pytest.raises(SerialLoraFileError, match=r"feeds \['norm1'\], a layout no registered host has"):
        equivalent_lora(adapter, dict(HOSTS["fused"].model().state_dict()))
    base = base_weights_file(HOSTS["fused"], tmp_path)
    assert main(["export-lora", str(path), str(tmp_path / "o.safetensors"), "--base", str(base)]) == 2
    assert "a layout no registered host has" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_resolve_projections_is_the_hosts_with_a_model_and_the_files_without(context):
    adapter = read_file(context.good)
    _, streams = match_host(target_model(HOSTS["fused"]).blocks[0].attn)
    assert resolve_projections(adapter, "blocks.0.attn", "input", streams) == ("qkv",)
    assert resolve_projections(adapter, "blocks.0.attn", "input") == ("qkv",)
    with pytest.raises(SerialLoraFileError, match="has no stream 'input'"):
        resolve_projections(adapter, "blocks.0.attn", "input", {})


def test_float_parsing_is_exact_for_what_the_writer_writes(context):
    for alpha in (6.0, 1e-5, 3.0e20, 0.1):
        assert read_file(context.rewrite(alpha=repr(alpha))).alpha == alpha
    assert math.isclose(read_file(context.rewrite(alpha="-2.5E+1")).alpha, -25.0)
