"""Reading and writing adapter files as files: private copies (no live memory map), directories,
and the one atomic-write helper (umask honoured, concurrent writers never collide)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core_models import HOSTS, file_tensors, same_bits, source_model, target_model
from serial_lora_core import (
    SerialLoraFileError,
    equivalent_lora,
    load_serial_lora,
    read_file,
    save_serial_lora,
    save_standard_lora,
)
from serial_lora_core.format import atomic_write


def _data_offset(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_rewriting_the_file_in_place_after_reading_changes_nothing(context):
    adapter = read_file(context.good)
    before = {key: (pair.down.clone(), pair.up.clone()) for key, pair in adapter.weights.items()}
    # Overwrite every tensor byte with NaN, in place (same inode, same size): a live mmap would see it.
    size = context.good.stat().st_size
    start = _data_offset(context.good)
    with open(context.good, "r+b") as handle:
        handle.seek(start)
        handle.write(torch.full(((size - start) // 4,), float("nan")).numpy().tobytes())
    for key, (down, up) in before.items():
        assert same_bits(adapter.weights[key].down, down) and same_bits(adapter.weights[key].up, up)
    model = target_model(HOSTS["fused"])
    with pytest.raises(SerialLoraFileError, match="sha256|NaN"):  # the edited file itself is refused
        load_serial_lora(model, context.good)


def test_truncating_the_file_after_reading_neither_crashes_nor_changes_the_adapter(context, tmp_path):
    # In a child process: with a memory map, touching the tensors after truncation is SIGBUS.
    script = f"""
import os, torch
from serial_lora_core import read_file
adapter = read_file({str(context.good)!r})
os.truncate({str(context.good)!r}, 0)
print(sum(float(p.down.double().sum() + p.up.double().sum()) for p in adapter.weights.values()))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    expected = sum(float(t.double().sum()) for t in context.tensors.values())
    assert float(result.stdout) == pytest.approx(expected, rel=1e-12)


def test_an_already_read_adapter_still_works_after_its_file_is_gone(context):
    adapter = read_file(context.good)
    base = HOSTS["fused"].model().state_dict()
    expected = equivalent_lora(read_file(context.good), base)
    os.truncate(context.good, 0)
    os.unlink(context.good)
    exported = equivalent_lora(adapter, base)
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k][0], expected[k][0]) and torch.equal(exported[k][1], expected[k][1]) for k in expected)


def test_a_directory_is_named_as_a_directory(tmp_path, context):
    folder = tmp_path / "adapter_dir"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(context.good.read_bytes())
    with pytest.raises(SerialLoraFileError, match=r"is a directory .*pytorch_lora_weights\.safetensors.*pass the path"):
        read_file(folder)
    with pytest.raises(SerialLoraFileError, match="no such file"):
        read_file(tmp_path / "absent.safetensors")


# ------------------------------------------------------------------------------------ atomic writes
def _writers(tmp_path: Path):
    source = source_model(HOSTS["fused"])
    pairs = {"blocks.0.attn.qkv": (torch.ones(2, 16), torch.ones(48, 2))}
    return {
        "save_serial_lora": lambda path: save_serial_lora(source, path),
        "save_standard_lora": lambda path: save_standard_lora(pairs, path),
        "atomic_write": lambda path: atomic_write(path, lambda tmp: Path(tmp).write_bytes(b"data")),
    }


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
@pytest.mark.parametrize("writer", ["save_serial_lora", "save_standard_lora", "atomic_write"])
def test_written_files_honour_the_umask(writer, umask, tmp_path):
    write = _writers(tmp_path)[writer]
    old = os.umask(umask)
    try:
        path = write(tmp_path / "out.safetensors")
    finally:
        os.umask(old)
    assert (os.stat(path).st_mode & 0o777) == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_concurrent_writers_never_collide(tmp_path):
    """Eight threads export different LoRAs to one path at once: every call succeeds, the result is
    one complete file (one of theirs), and no temp file is left (a fixed temp name collided)."""
    path = tmp_path / "lora.safetensors"
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def export(value: int) -> None:
        pairs = {"attn.qkv": (torch.full((2, 16), float(value)), torch.full((48, 2), float(value)))}
        barrier.wait()
        try:
            for _ in range(5):
                save_standard_lora(pairs, path)
        except BaseException as err:  # noqa: BLE001 - collected for the assertion below
            errors.append(err)

    threads = [threading.Thread(target=export, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert os.listdir(tmp_path) == ["lora.safetensors"]
    tensors, _ = file_tensors(path)
    value = tensors["attn.qkv.lora_A.weight"][0, 0].item()
    assert value in range(8) and all(bool((t == value).all()) for t in tensors.values())


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"x": torch.zeros(2)}, path)
    before = path.read_bytes()

    def fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(path, fail)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["a.safetensors"]


def test_an_unreadable_file_is_a_clear_error(context, monkeypatch, capsys):
    import serial_lora_core.format as format_module
    from serial_lora_core.cli import main

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(format_module, "open", denied, raising=False)  # (root ignores chmod 000)
    with pytest.raises(SerialLoraFileError, match=r"cannot be read \(Permission denied\)"):
        read_file(context.good)
    assert main(["info", str(context.good)]) == 2 and "Permission denied" in capsys.readouterr().err
