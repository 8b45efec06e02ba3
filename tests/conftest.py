"""Shared pytest fixtures (each helper appends its own; keep them small)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def write_image_folder(root: Path, images_per_class: dict[str, int], size: int = 16, seed: int = 0) -> Path:
    """A class-per-sub-folder PNG folder whose classes differ by colour (so a few steps can learn them)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    palette = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40), (200, 60, 200), (40, 210, 210)]
    for index, (name, count) in enumerate(sorted(images_per_class.items())):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = np.clip(np.array(palette[index % len(palette)]) + rng.normal(0, 25, (size, size, 3)), 0, 255)
            Image.fromarray(pixels.astype("uint8")).save(folder / f"{name}_{i}.png")
    return root


def train_briefly(task: Any, out: Path, method: str = "serial", **arguments: Any) -> tuple[Any, list[float]]:
    """Train `task` for a few CPU steps into `out` (rank 4, no dropout, float32, no progress bar; `arguments`
    add to or override these TrainingArguments): the engine's result and the losses it logged."""
    import json

    from serial_lora_train.engine import METRICS_FILE, TrainingArguments, train

    defaults = dict(output_dir=str(out), method=method, rank=4, dropout=0.0, mixed_precision="no",
                    disable_progress_bar=True)
    result = train(task, TrainingArguments(**{**defaults, **arguments}))
    losses = [r["loss"] for r in map(json.loads, (out / METRICS_FILE).read_text().splitlines()) if "loss" in r]
    return result, losses


def run_card_snippet(out: Path, monkeypatch: Any) -> dict:
    """Run the python block of a trainer's model card (`out`/README.md) as a user would paste it, from the folder
    holding the card (its file names are relative to it); returns the snippet's namespace."""
    monkeypatch.chdir(out)
    scope: dict = {}
    exec((out / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0], scope)  # noqa: S102
    return scope


@pytest.fixture
def image_folders(tmp_path: Path) -> tuple[Path, Path]:
    """(train, val) folders: 3 colour classes, 6 training and 2 validation 16x16 images each."""
    classes = ("red", "green", "blue")
    train = write_image_folder(tmp_path / "train", dict.fromkeys(classes, 6), seed=0)
    val = write_image_folder(tmp_path / "val", dict.fromkeys(classes, 2), seed=1)
    return train, val


@pytest.fixture(params=["fused", "split", "joint", "functional"])
def case(request):
    """Each tiny host layout of tests/core_models.py, with its extra host registered for the test."""
    from core_models import HOSTS, host_registered

    with host_registered(HOSTS[request.param]) as host_case:
        yield host_case


@pytest.fixture
def context(tmp_path: Path):
    """A valid adapter file of the fused tiny ViT (depth 2, width 16, rank 4, alpha 6) as a
    `core_models.FileContext`, with a folder for edited copies."""
    from core_models import HOSTS, FileContext, file_tensors, source_model
    from serial_lora_core import save_serial_lora

    good = save_serial_lora(source_model(HOSTS["fused"]), tmp_path / "good.safetensors")
    tensors, metadata = file_tensors(good)
    folder = tmp_path / "bad"
    folder.mkdir()
    return FileContext(folder=folder, good=good, tensors=tensors, metadata=metadata)



@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    """The real ComfyUI 0.30.0 the ComfyUI tests run: third_party/ComfyUI, or $SERIAL_LORA_COMFYUI."""
    import os

    folder = Path(os.environ.get("SERIAL_LORA_COMFYUI", Path(__file__).resolve().parents[1] / "third_party" / "ComfyUI"))
    if not (folder / "main.py").is_file() or not (folder / "comfy" / "model_patcher.py").is_file():
        pytest.fail(f"ComfyUI not found at {folder}: run `bash scripts/setup_comfyui.sh` (it installs ComfyUI 0.30.0 "
                    "into third_party/ComfyUI) or set SERIAL_LORA_COMFYUI to a ComfyUI 0.30.0 folder")
    return folder
