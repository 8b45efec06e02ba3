"""The `serial-lora` command: `info` (text and --json), errors (exit 2, message on stderr), `export-lora`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core_models import DEPTH, HOSTS, base_weights_file, randomize_adapters
from serial_lora_core import (
    ARCHITECTURE_ATTRIBUTE,
    SerialLoraConfig,
    SerialLoraFileError,
    inject_serial_lora,
    load_serial_lora,
    merge_serial_lora,
    read_file,
    save_serial_lora,
    serial_lora_modules,
    serial_lora_parameters,
)
from serial_lora_core.cli import main

CLI = Path(sys.executable).with_name("serial-lora")


def saved_adapter(case, folder: Path, rank=4, alpha=6.0, use_rslora=False):
    model = case.model()
    setattr(model, ARCHITECTURE_ATTRIBUTE, f"tiny_{case.name}")
    inject_serial_lora(model, SerialLoraConfig(rank=rank, alpha=alpha, use_rslora=use_rslora))
    randomize_adapters(model, seed=3)
    path = save_serial_lora(model, folder / f"{case.name}.safetensors", base_model="org/tiny")
    return model, path


@pytest.mark.parametrize("host", ["fused", "split", "joint"])
def test_info_json(host, tmp_path, capsys):
    case = HOSTS[host]
    model, path = saved_adapter(case, tmp_path, rank=3, alpha=1.5, use_rslora=True)
    assert main(["info", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    info = json.loads(captured.out)
    assert info["format"] == "serial_lora"
    assert info["format_version"] == 1
    assert (info["rank"], info["alpha"], info["use_rslora"]) == (3, 1.5, True)
    assert info["scaling"] == pytest.approx(1.5 / 3 ** 0.5)
    assert info["streams"] == {s: list(p) for s, (p, _) in case.streams.items()}
    assert info["adapted_attention_modules"] == DEPTH == len(list(serial_lora_modules(model)))
    assert info["parameters"] == sum(p.numel() for p in serial_lora_parameters(model))
    assert info["parameters"] == DEPTH * sum(2 * d * 3 for _, d in case.streams.values())
    assert info["architecture"] == f"tiny_{host}"
    assert info["base_model"] == "org/tiny"
    assert info["dtype"] == "float32"


def test_info_text(tmp_path, capsys):
    _, path = saved_adapter(HOSTS["split"], tmp_path)
    assert main(["info", str(path)]) == 0
    rows = dict((line.split(None, 1) + [""])[:2] for line in capsys.readouterr().out.splitlines())
    assert rows["format"] == "serial_lora"
    assert rows["format_version"] == "1"
    assert rows["rank"] == "4"
    assert rows["alpha"] == "6.0"
    assert rows["streams"] == str({"input": ["q_proj", "k_proj", "v_proj"]})
    assert rows["adapted_attention_modules"] == str(DEPTH)
    assert rows["parameters"] == str(DEPTH * 2 * 16 * 4)
    assert rows["architecture"] == "tiny_split"


BAD = {
    "truncated": lambda good, folder: _write(folder / "t.safetensors", good.read_bytes()[:100]),
    "text_file": lambda good, folder: _write(folder / "notes.safetensors", b"not an adapter\n"),
    "missing": lambda good, folder: folder / "missing.safetensors",
    "standard_lora": lambda good, folder: _standard(folder / "std.safetensors"),
    "torch_save": lambda good, folder: _torch_save(folder / "a.pt"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _standard(path: Path) -> Path:
    save_file({"q.lora_A.weight": torch.zeros(2, 4), "q.lora_B.weight": torch.zeros(4, 2)}, path)
    return path


def _torch_save(path: Path) -> Path:
    torch.save({"x": torch.zeros(2)}, path)
    return path


@pytest.mark.parametrize("bad", list(BAD))
def test_info_on_a_bad_file_exits_2_with_the_error_on_stderr(bad, tmp_path, capsys):
    _, good = saved_adapter(HOSTS["fused"], tmp_path)
    path = BAD[bad](good, tmp_path)
    with pytest.raises(SerialLoraFileError) as expected:
        read_file(path)
    assert main(["info", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == f"serial-lora: error: {expected.value}"
    assert path.name in captured.err


def test_installed_console_command(tmp_path):
    _, path = saved_adapter(HOSTS["fused"], tmp_path)
    bad = _write(tmp_path / "bad.safetensors", b"\x00" * 10)
    # One process for both calls: torch is slow to import.
    script = (
        "import subprocess, sys, json\n"
        f"ok = subprocess.run([{str(CLI)!r}, 'info', {str(path)!r}, '--json'], capture_output=True, text=True)\n"
        f"bad = subprocess.run([{str(CLI)!r}, 'info', {str(bad)!r}], capture_output=True, text=True)\n"
        "print(json.dumps([ok.returncode, ok.stdout, bad.returncode, bad.stdout, bad.stderr]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    ok_code, ok_out, bad_code, bad_out, bad_err = json.loads(result.stdout)
    assert ok_code == 0 and json.loads(ok_out)["rank"] == 4
    assert bad_code == 2 and bad_out == "" and "bad.safetensors" in bad_err and "serial-lora: error:" in bad_err


@pytest.mark.parametrize("host", ["fused", "split", "joint"])
def test_export_lora_is_the_exact_standard_lora(host, tmp_path, capsys):
    case = HOSTS[host]
    model, path = saved_adapter(case, tmp_path, rank=4, alpha=2.0, use_rslora=True)
    base = base_weights_file(case, tmp_path)
    out = tmp_path / "standard.safetensors"
    assert main(["export-lora", str(path), str(out), "--base", str(base), "--prefix", "", "--scale", "0.5"]) == 0
    assert "wrote" in capsys.readouterr().out
    with safe_open(str(out), framework="pt") as handle:
        exported = {k: handle.get_tensor(k) for k in handle.keys()}
    merge_serial_lora(model, scale=0.5)
    projections = [f"{a}.{p}" for a, m in serial_lora_modules(model) for spec in m.stream_specs.values() for p in spec.projections]
    assert set(exported) == {f"{p}.lora_{x}.weight" for p in projections for x in "AB"}
    original = case.model()
    for projection in projections:
        down, up = exported[f"{projection}.lora_A.weight"], exported[f"{projection}.lora_B.weight"]
        assert down.shape[0] == up.shape[1] == 4
        weight = original.get_submodule(projection).weight
        torch.testing.assert_close(weight + up @ down, model.get_submodule(projection).weight, rtol=0, atol=1e-5)
    # A standard LoRA is refused by the Serial LoRA loader instead of being misapplied.
    with pytest.raises(SerialLoraFileError, match="standard LoRA"):
        load_serial_lora(case.model(), out)


@pytest.mark.parametrize("target", ["input", "base", "input_through_a_link"])
def test_export_lora_refuses_to_overwrite_its_own_input_or_base(target, tmp_path, capsys):
    # `serial-lora export-lora a.safetensors a.safetensors` used to replace the adapter with its export.
    case = HOSTS["fused"]
    _, path = saved_adapter(case, tmp_path)
    base = base_weights_file(case, tmp_path)
    output = {"input": path, "base": base, "input_through_a_link": tmp_path / "link.safetensors"}[target]
    if target == "input_through_a_link":
        output.symlink_to(path)
    before = {p: p.read_bytes() for p in (path, base)}
    assert main(["export-lora", str(path), str(output), "--base", str(base)]) == 2
    err = capsys.readouterr().err
    assert str(output) in err and ("--base file" if target == "base" else "input file") in err
    assert {p: p.read_bytes() for p in (path, base)} == before


def test_export_lora_with_base_missing_a_projection_exits_2(tmp_path, capsys):
    case = HOSTS["fused"]
    _, path = saved_adapter(case, tmp_path)
    base = tmp_path / "base.safetensors"
    save_file({"head.weight": torch.zeros(5, 16)}, base)
    assert main(["export-lora", str(path), str(tmp_path / "out.safetensors"), "--base", str(base), "--prefix", ""]) == 2
    assert "blocks.0.attn.qkv.weight" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out.safetensors")


# ------------------------------------------------------------------------------------ issue 10/13 points
def test_version(tmp_path, capsys):
    from serial_lora_core import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"serial-lora {__version__}"
    _, path = saved_adapter(HOSTS["fused"], tmp_path)
    assert read_file(path).info.created_by == f"serial-lora {__version__}"


HOSTILE = "tiny\x1b[2J\x1b]0;pwned\x07\x9b31m\u202eevil\r"


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_info_escapes_control_characters(as_json, tmp_path, capsys):
    model = HOSTS["fused"].model()
    inject_serial_lora(model, SerialLoraConfig(rank=2))
    path = save_serial_lora(model, tmp_path / "a.safetensors", architecture=HOSTILE, base_model="org/\x07x",
                            metadata={"note": "\x1b[31m"})
    assert main(["info", str(path)] + (["--json"] if as_json else [])) == 0
    out = capsys.readouterr().out
    assert not any(ch in out for ch in "\x1b\x07\x9b\u202e\r"), repr(out)
    if as_json:
        assert json.loads(out)["architecture"] == HOSTILE  # escaped, not lost
    else:
        assert "tiny\\x1b[2J\\x1b]0;pwned\\x07\\x9b31m\\u202eevil\\r" in out


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf", "1e300", "-1e39"])
def test_export_lora_refuses_scales_beyond_float32(scale, tmp_path, capsys):
    _, path = saved_adapter(HOSTS["fused"], tmp_path)
    base = base_weights_file(HOSTS["fused"], tmp_path)
    out = tmp_path / "out.safetensors"
    assert main(["export-lora", str(path), str(out), "--base", str(base), f"--scale={scale}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("serial-lora: error: --scale=") and "finite" in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("host, prefix", [("fused", ""), ("split", ""), ("joint", "transformer.")])
def test_export_lora_key_prefix_follows_the_host(host, prefix, tmp_path):
    case = HOSTS[host]
    _, path = saved_adapter(case, tmp_path)
    base = base_weights_file(case, tmp_path)
    for argv, expected in (([], prefix), (["--prefix", "unet."], "unet.")):
        out = tmp_path / "out.safetensors"
        assert main(["export-lora", str(path), str(out), "--base", str(base), *argv]) == 0
        with safe_open(str(out), framework="pt") as handle:
            keys = list(handle.keys())
        assert keys and all(k.startswith(f"{expected}blocks.") for k in keys), keys[:2]


def test_export_lora_from_an_unreachable_hub_id_is_one_line(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    _, path = saved_adapter(HOSTS["joint"], tmp_path)
    assert main(["export-lora", str(path), str(tmp_path / "o.safetensors"), "--base", "org/not-cached"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "'org/not-cached'" in err and "local .safetensors file or model folder" in err and "HF_HUB_OFFLINE" in err
