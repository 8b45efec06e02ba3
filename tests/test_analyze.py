"""`serial-lora analyze`: spectra of the effective q, k, v weights, CSV rows and PNG, with a PEFT LoRA side by side."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import save_file

import timm
import timm_plugin  # noqa: F401
from serial_lora_core import SerialLoraError, merge_serial_lora, save_serial_lora, serial_lora_modules
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


def test_merged_adapters_are_refused(tmp_path):
    model = trained_like("serial")
    merge_serial_lora(model)
    with pytest.raises(SerialLoraError, match="merged"):
        analyze(model, tmp_path)
    assert not any(tmp_path.iterdir())
