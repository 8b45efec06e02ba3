"""Format version 2: `modules_to_save` (whole modules, e.g. a new classification head, as PEFT's),
and version-1 files still loading."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from core_models import HOSTS, assert_unchanged, base_weights_file, file_tensors, run, snapshot, source_model, target_model
from serial_lora_core import FORMAT_VERSION, SerialLoraFileError, load_serial_lora, read_file, save_serial_lora
from serial_lora_core.format import write_file

CASE = HOSTS["fused"]


def trained(seed: int = 4) -> nn.Module:
    """An adapted model whose head was also trained (changed from the base)."""
    model = source_model(CASE, seed=seed)
    with torch.no_grad():
        model.head.weight.mul_(-2.0).add_(0.5)
        model.head.bias.fill_(0.25)
    return model


def test_modules_to_save_round_trip(tmp_path):
    source = trained()
    path = save_serial_lora(source, tmp_path / "a.safetensors", modules_to_save=("head",))
    tensors, metadata = file_tensors(path)
    assert metadata["format_version"] == "2" == str(FORMAT_VERSION)
    assert json.loads(metadata["modules_to_save"]) == ["head"]
    assert {k for k in tensors if k.startswith("modules_to_save.")} == {"modules_to_save.head.weight", "modules_to_save.head.bias"}
    adapter = read_file(path)
    assert set(adapter.modules_to_save) == {"head.weight", "head.bias"}
    assert torch.equal(adapter.modules_to_save["head.bias"], source.head.bias.detach())

    target = target_model(CASE)
    inputs = CASE.inputs()
    assert not torch.equal(run(target, inputs), run(source, inputs))
    load_serial_lora(target, path, trainable=True)
    assert torch.equal(run(target, inputs), run(source, inputs))
    assert torch.equal(target.head.weight, source.head.weight) and target.head.weight.requires_grad


def test_a_head_of_another_shape_is_refused_naming_key_and_shapes(tmp_path):
    path = save_serial_lora(trained(), tmp_path / "a.safetensors", modules_to_save=("head",))
    model = target_model(CASE)
    model.head = nn.Linear(16, 7)
    before = snapshot(model)
    with pytest.raises(SerialLoraFileError, match=r"'modules_to_save\.head\.(weight|bias)' has shape \((5, 16|5,)\).*\((7, 16|7,)\)"):
        load_serial_lora(model, path)
    assert_unchanged(model, before)


def test_a_model_without_the_module_is_refused(tmp_path):
    path = save_serial_lora(trained(), tmp_path / "a.safetensors", modules_to_save=("head",))
    model = target_model(CASE)
    del model.head
    model.head = nn.Identity()
    before = snapshot(model)
    with pytest.raises(SerialLoraFileError, match="no parameter or buffer 'head.weight'|no parameter or buffer 'head.bias'"):
        load_serial_lora(model, path)
    assert_unchanged(model, before)


def test_a_version_1_file_still_loads(context):
    """A file as the version-1 writer wrote it (no modules_to_save field, format_version "1")."""
    assert context.metadata["format_version"] == "1" and "modules_to_save" not in context.metadata
    model = target_model(CASE)
    head = model.head.weight.clone()
    adapter = load_serial_lora(model, context.good)
    assert adapter.format_version == 1 and adapter.modules_to_save == {}
    assert torch.equal(model.head.weight, head)
    assert torch.equal(run(model, CASE.inputs()), run(source_model(CASE), CASE.inputs()))


def _v2(ctx, tensors=None, **changes):
    return ctx.rewrite({**ctx.tensors, **(tensors if tensors is not None else {"modules_to_save.head.bias": torch.zeros(5)})},
                       **{"format_version": "2", "modules_to_save": '["head"]', **changes})


# name -> (make the file, substrings of the message)
BAD_V2 = {
    "field_in_a_version_1_file": (lambda c: _v2(c, format_version="1"), ("'modules_to_save'", "format_version >= 2")),
    "key_outside_the_declared_modules": (lambda c: _v2(c, {"modules_to_save.norm.bias": torch.zeros(16),
                                                           "modules_to_save.head.bias": torch.zeros(5)}),
                                         ("'modules_to_save.norm.bias'", "['head']")),
    "declared_module_without_tensors": (lambda c: _v2(c, modules_to_save='["head", "norm"]'), ("'norm' has no tensors",)),
    "nested_declared_modules": (lambda c: _v2(c, modules_to_save='["head", "head.x"]'), ("inside 'head'",)),
    "nan_in_a_saved_tensor": (lambda c: _v2(c, {"modules_to_save.head.bias": torch.full((5,), float("nan"))}),
                              ("'modules_to_save.head.bias'", "NaN")),
    "integer_saved_tensor": (lambda c: _v2(c, {"modules_to_save.head.bias": torch.zeros(5, dtype=torch.int64)}),
                             ("'modules_to_save.head.bias'", "torch.int64")),
    "unknown_parameter": (lambda c: _v2(c, {"modules_to_save.head.scale": torch.zeros(5)}), ("'head.scale'",)),
    "v2_key_without_the_field": (lambda c: c.rewrite({**c.tensors, "modules_to_save.head.bias": torch.zeros(5)}),
                                 ("'modules_to_save.head.bias'", "unexpected key")),
}


@pytest.mark.parametrize("bad", list(BAD_V2))
def test_bad_modules_to_save_are_refused_and_the_model_is_unchanged(bad, context):
    make, expected = BAD_V2[bad]
    path = make(context)
    model = target_model(CASE)
    before = snapshot(model)
    with pytest.raises(SerialLoraFileError) as error:
        load_serial_lora(model, path)
    for part in expected:
        assert part in str(error.value), str(error.value)
    assert str(path) in str(error.value)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "modules, message",
    [(("missing",), "'missing', which"), (("blocks.0",), "contains Serial LoRA adapters"), (("",), "''")],
)
def test_save_refuses_bad_modules_to_save(modules, message, tmp_path):
    with pytest.raises(SerialLoraFileError, match=message):
        save_serial_lora(trained(), tmp_path / "a.safetensors", modules_to_save=modules)
    assert list(tmp_path.iterdir()) == []


def test_a_written_version_2_file_is_the_same_through_write_file(tmp_path):
    # The writer never produces a file the reader refuses: metadata and tensors re-read identically.
    path = save_serial_lora(trained(), tmp_path / "a.safetensors", modules_to_save=["head"])
    tensors, metadata = file_tensors(path)
    again = write_file(tmp_path / "b.safetensors", tensors, {k: v for k, v in metadata.items() if k != "sha256"})
    assert read_file(again).metadata == read_file(path).metadata


def test_export_refuses_a_file_with_modules_to_save(tmp_path, capsys):
    from serial_lora_core.cli import main

    path = save_serial_lora(trained(), tmp_path / "a.safetensors", modules_to_save=("head",))
    base = base_weights_file(CASE, tmp_path)
    out = tmp_path / "out.safetensors"
    assert main(["export-lora", str(path), str(out), "--base", str(base)]) == 2
    assert "modules_to_save ['head']" in capsys.readouterr().err and not out.exists()
    assert main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["modules_to_save"] == ["head"]
