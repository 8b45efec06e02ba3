"""`serial-lora analyze`: spectra of the effective q, k, v weights, CSV rows and PNG, with a PEFT LoRA side by side."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import timm
import timm_plugin  # noqa: F401
from serial_lora_core import SerialLoraConfig, SerialLoraError, merge_serial_lora, save_serial_lora, serial_lora_modules
from serial_lora_core.cli import main as cli_main
from serial_lora_train.analyze import CSV_FILE, PNG_FILE, analyze, spectra
from serial_lora_train.methods import apply_method

ARCH = "vit_base_patch16_clip_224"
TINY = {"img_size": 16, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 3}


def trained_like(method: str, seed: int = 0) -> torch.nn.Module:
    """The tiny base (fixed seed) with `method`'s adapter, B randomised as if trained."""
    torch.manual_seed(0)
    model, _ = apply_method(timm.create_model(ARCH, **TINY), method, rank=4, trainable_modules=("head",))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".up." in name or "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def test_spectra_match_the_hand_formula():
    model = trained_like("serial")
    rows, variants = spectra(model)
    assert variants == ("base", "serial_lora")
    wrapper = dict(serial_lora_modules(model))["blocks.1.attn"]
    adapter = wrapper["default"]["input"]
    w_q = model.blocks[1].attn.qkv.weight[:32].detach()
    # q = W_q (I + s B A) x: its singular values, from the definition rather than the merged-weight formula.
    by_hand = torch.linalg.svdvals(w_q @ (torch.eye(32) + adapter.factor * adapter.up.weight @ adapter.down.weight))
    ours = [r["serial_lora"] for r in rows if r["block"] == "blocks.1.attn" and r["projection"] == "q"]
    base = [r["base"] for r in rows if r["block"] == "blocks.1.attn" and r["projection"] == "q"]
    torch.testing.assert_close(torch.tensor(ours), by_hand, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(base), torch.linalg.svdvals(w_q), rtol=1e-5, atol=1e-6)
    assert ours != base


def test_cli_writes_png_and_one_csv_row_per_block_projection_and_singular_value(tmp_path, capsys):
    serial, lora = trained_like("serial", seed=1), trained_like("lora", seed=2)
    base = tmp_path / "base.safetensors"
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in timm.create_model(ARCH, **{**TINY, "num_classes": 1000}).state_dict().items()},
              str(base))
    adapter = save_serial_lora(serial, tmp_path / "a.safetensors", architecture=ARCH, modules_to_save=("head",))
    lora.save_pretrained(str(tmp_path / "peft"))
    kwargs = {k: v for k, v in TINY.items() if k != "num_classes"}
    rc = cli_main(["analyze", str(adapter), "--model", ARCH, "--pretrained-file", str(base), "--model-kwargs",
                   json.dumps(kwargs), "--compare", str(tmp_path / "peft"), "--output-dir", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    with open(tmp_path / "out" / CSV_FILE) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 3 * 32  # blocks x (q, k, v) x singular values of a 32 x 32 projection
    assert set(rows[0]) == {"block", "stream", "projection", "index", "base", "serial_lora", "lora"}
    assert {r["projection"] for r in rows} == {"q", "k", "v"}
    assert all(float(r["lora"]) != float(r["base"]) for r in rows[:5])
    assert (tmp_path / "out" / PNG_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Base weights of another shape (no --model-kwargs): one line naming the file and what to pass, no output.
    rc = cli_main(["analyze", str(adapter), "--model", ARCH, "--pretrained-file", str(base), "--output-dir",
                   str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("serial-lora: error: --pretrained-file") and "does not fit" in err, err
    assert "--model-kwargs" in err and len(err.splitlines()) == 1 and not (tmp_path / "bad").exists()
    # Base weights whose head has another class count (pre-trained for 400 classes, say): the head is the
    # adapter file's, the base's is not needed and the rest of the base loads as it is.
    other = tmp_path / "base7.safetensors"
    weights = load_file(str(base))
    weights["head.weight"], weights["head.bias"] = torch.randn(7, weights["head.weight"].shape[1]), torch.zeros(7)
    save_file(weights, str(other))
    rc = cli_main(["analyze", str(adapter), "--model", ARCH, "--pretrained-file", str(other), "--model-kwargs",
                   json.dumps(kwargs), "--output-dir", str(tmp_path / "other")])
    assert rc == 0, capsys.readouterr().err
    with open(tmp_path / "other" / CSV_FILE) as handle:
        assert [r["base"] for r in csv.DictReader(handle)] == [r["base"] for r in rows]  # the same base spectra


def _adapted(kind: str) -> torch.nn.Module:
    """A tiny model of the other hosts with Serial LoRA (rank 4), B randomised as if trained."""
    from timm_models import randomize_adapters

    config = SerialLoraConfig(rank=4, streams=("image", "text") if kind == "sd3" else None)
    if kind == "sd3":
        import diffusers_loader
        from sd3_tiny import tiny_sd3_transformer

        model = tiny_sd3_transformer()
        diffusers_loader.add_serial_lora(model, config)
    else:
        import transformers_plugin as tp
        from hf_tiny import tiny_clip, tiny_sam

        model = tiny_clip() if kind == "clip" else tiny_sam()
        tp.inject(model, config)
    randomize_adapters(model)
    return model


# kind: (streams, rows = blocks x streams x (q, k, v) x width's singular values)
OTHER_HOSTS = {"clip": ({"input"}, 2 * 3 * 32 + 2 * 3 * 48),   # text tower 32 wide, vision tower 48 wide
               "sam": ({"input"}, 2 * 3 * 32),                 # image encoder only, fused qkv
               "sd3": ({"image", "text"}, 2 * 2 * 3 * 32)}     # joint attention: image and text streams


@pytest.mark.parametrize("kind", list(OTHER_HOSTS))
def test_any_adapted_model_gets_its_spectra_from_python(kind, tmp_path):
    streams, count = OTHER_HOSTS[kind]
    result = analyze(_adapted(kind), tmp_path)
    with open(result.csv_path) as handle:
        rows = list(csv.DictReader(handle))
    assert result.rows == len(rows) == count and {r["stream"] for r in rows} == streams
    assert any(float(r["serial_lora"]) != float(r["base"]) for r in rows)
    assert result.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merged_adapters_are_refused(tmp_path):
    model = trained_like("serial")
    merge_serial_lora(model)
    with pytest.raises(SerialLoraError, match="merged"):
        analyze(model, tmp_path)
    assert not any(tmp_path.iterdir())
