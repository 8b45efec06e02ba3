"""`serial-lora train-sam`: a tiny transformers SamModel, image/mask folders written here (CPU, seconds)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SamModel

import serial_lora_core as core
from conftest import run_card_snippet, train_briefly
from hf_tiny import SAM_IMAGE, tiny_sam
from serial_lora_core.cli import main as cli_main
from serial_lora_train.engine import TrainingArguments
from serial_lora_train.sam import (
    ADAPTER_FILE,
    PEFT_DIR,
    SamOptions,
    SamTask,
    box_from_mask,
    dice_bce_loss,
    dice_scores,
    mask_logits,
)

FAST = ["--rank", "4", "--train-batch-size", "4", "--learning-rate", "1e-2", "--dropout", "0",
        "--disable-progress-bar", "--mixed-precision", "no"]


def write_mask_folder(root: Path, count: int = 6, size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    """images/ + masks/: a bright rectangle (the object) on a noisy dark background, its mask 0/255."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    width, height = size
    for i in range(count):
        x0, y0 = rng.integers(2, width // 2), rng.integers(2, height // 2)
        x1, y1 = x0 + rng.integers(8, width // 2), y0 + rng.integers(8, height // 2)
        mask = np.zeros((height, width), np.uint8)
        mask[y0:y1, x0:x1] = 255
        image = rng.normal(40, 10, (height, width, 3))
        image[mask > 0] = (220, 200, 60)
        Image.fromarray(np.clip(image, 0, 255).astype("uint8")).save(root / "images" / f"img{i}.jpg")
        Image.fromarray(mask).save(root / "masks" / f"img{i}.png")
    return root


@pytest.fixture
def sam_data(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(base model folder, train folder, val folder)."""
    base = tmp_path / "base"
    tiny_sam().save_pretrained(base)
    return base, write_mask_folder(tmp_path / "train", 8), write_mask_folder(tmp_path / "val", 2, seed=1)


def _mask(cells: str) -> torch.Tensor:
    return torch.tensor([[c == "#" for c in row] for row in cells.split()])


@pytest.mark.parametrize("pred, target, dice", [
    ("##.. ##.. .... ....", "##.. ##.. .... ....", 1.0),
    ("##.. ##.. .... ....", ".... .... ..## ..##", 0.0),
    ("##.. ##.. .... ....", ".##. .##. .... ....", 0.5),      # 2 shared of 4 + 4
    ("#... #... .... ....", "##.. ##.. ##.. ....", 0.5),      # 2 shared of 2 + 6
    ("#### #### #### ####", "#... .... .... ....", 2 / 17),
])
def test_dice_on_hand_made_masks(pred, target, dice):
    got = dice_scores(_mask(pred)[None], _mask(target)[None])
    torch.testing.assert_close(got, torch.tensor([dice]))


def test_box_prompt_is_the_bounding_box_of_the_mask_and_the_loss_vanishes_on_a_perfect_prediction():
    mask = _mask(".... .##. .### ....").float()
    assert box_from_mask(mask).tolist() == [1.0, 1.0, 4.0, 3.0]  # x1, y1, x2, y2 (exclusive ends)
    assert dice_bce_loss((mask * 2 - 1)[None] * 30, mask[None]).item() < 1e-3
    assert dice_bce_loss(-(mask * 2 - 1)[None] * 30, mask[None]).item() > 1


@pytest.mark.parametrize("method", ["serial", "lora"])
def test_training_lowers_the_loss_on_the_image_encoder_only_and_reports_dice(method, sam_data, tmp_path,
                                                                             monkeypatch):
    base, train_dir, val_dir = sam_data
    out = tmp_path / "out"
    task = SamTask(SamOptions(model=str(base), data_dir=str(train_dir), val_dir=str(val_dir), box_jitter=0.0))
    # The whole training set in every batch: the losses of successive steps are comparable.
    result, losses = train_briefly(task, out, method, train_batch_size=8, learning_rate=2e-2, max_train_steps=5)
    assert len(losses) == 5 and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert set(result.metrics) == {"dice", "val_loss"} and 0 <= result.metrics["dice"] <= 1
    assert "= 3x Serial 512: PEFT shares A across q,k,v on a fused qkv+proj" in result.summary  # SAM's fused qkv
    fresh = SamModel.from_pretrained(base).eval()
    trained = result.model.eval().cpu()  # trained on a GPU where there is one; compared on the CPU
    frozen = {k: v for k, v in fresh.state_dict().items() if not k.startswith("vision_encoder.")}
    now = trained.state_dict() if method == "serial" else trained.get_base_model().state_dict()
    assert frozen and all(torch.equal(now[k], v) for k, v in frozen.items())  # prompt encoder + mask decoder
    pixels, boxes, *_ = next(iter(torch.utils.data.DataLoader(task.val_set, batch_size=2)))
    from_card = run_card_snippet(out, monkeypatch)["model"].eval()  # the model card's snippet, as written
    with torch.no_grad():
        torch.testing.assert_close(mask_logits(from_card, pixels, boxes), mask_logits(trained, pixels, boxes),
                                   rtol=1e-4, atol=1e-5)
    if method == "lora":
        assert (out / PEFT_DIR / "adapter_config.json").is_file()
        return
    adapter = core.read_file(out / ADAPTER_FILE)
    assert json.loads(adapter.metadata["towers"]) == ["image_encoder"]
    assert all(name.startswith("vision_encoder.") for name in adapter.attentions)
    core.load_serial_lora(fresh, out / ADAPTER_FILE)  # the plain core one-liner
    with torch.no_grad():
        torch.testing.assert_close(mask_logits(fresh, pixels, boxes), mask_logits(trained, pixels, boxes),
                                   rtol=1e-4, atol=1e-5)


def test_data_fraction_and_validation_split_are_drawn_with_the_seed(sam_data):
    _, train_dir, _ = sam_data
    task = SamTask(SamOptions(model="unused", data_dir=str(train_dir), val_fraction=0.25, data_fraction=0.5))
    train_pairs, val_pairs = task._split(seed=0)
    assert (len(train_pairs), len(val_pairs)) == (3, 2)  # 8 pairs: 2 held out, half of the other 6 trained on
    assert not set(train_pairs) & set(val_pairs)
    assert task._split(seed=0) == (train_pairs, val_pairs)
    assert any(task._split(seed=s) != (train_pairs, val_pairs) for s in range(1, 5))


def _break(root: Path, kind: str) -> str:
    """Spoil the mask of img0 in one way; return the message expected."""
    mask = root / "masks" / "img0.png"
    if kind == "missing":
        mask.unlink()
        return r"no mask .*img0\.png for image .*img0\.jpg"
    if kind == "size":
        Image.fromarray(np.full((10, 12), 255, np.uint8)).save(mask)
        return r"mask .*img0\.png is 12x10 but image .*img0\.jpg is 48x40"
    if kind == "binary":
        Image.fromarray(np.arange(48 * 40).reshape(40, 48).astype(np.uint8)).save(mask)
        return r"mask .*img0\.png is not binary \(values \[0, 1, 2, "
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(mask)
    return r"mask .*img0\.png is empty \(no object pixel\)"


@pytest.mark.parametrize("kind", ["missing", "size", "binary", "empty"])
def test_a_bad_mask_is_named_or_skipped_and_counted(kind, sam_data, tmp_path, capsys):
    base, train_dir, val_dir = sam_data
    message = _break(train_dir, kind)
    args = ["train-sam", "--model", str(base), "--data-dir", str(train_dir), "--val-dir", str(val_dir),
            "--max-train-steps", "1", *FAST]
    out = tmp_path / "out"
    assert cli_main([*args, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("serial-lora: error: ") and re.search(message, err), err
    assert "--skip-bad-images" in err and not out.exists()
    assert cli_main([*args, "--output-dir", str(out), "--skip-bad-images"]) == 0
    assert re.search(r"skipped bad pairs\s+1\b", capsys.readouterr().out)


@pytest.mark.parametrize("extra, message", [
    (["--data-fraction", "0"], r"--data-fraction must be in \(0, 1\]"),
    (["--box-jitter", "1.5"], r"--box-jitter must be in \[0, 1\)"),
    (["--data-dir", "/nonexistent"], r"--data-dir='/nonexistent' needs the sub-folders images/ and masks/"),
    (["--model", "/nonexistent/sam"], r"--model '/nonexistent/sam': cannot load a SamModel"),
])
def test_bad_arguments_exit_2_with_one_clear_line(extra, message, sam_data, tmp_path, capsys):
    base, train_dir, _ = sam_data
    args = ["train-sam", "--model", str(base), "--data-dir", str(train_dir), "--output-dir", str(tmp_path / "o"),
            "--max-train-steps", "1", *FAST, *extra]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("serial-lora: error: ") and re.search(message, err), err


def test_inputs_go_through_sams_processor_and_training_boxes_are_jittered_within_the_image(sam_data):
    from transformers import SamProcessor

    base, train_dir, val_dir = sam_data  # 48x40 images: the longest side becomes SAM_IMAGE, the rest is padding
    task = SamTask(SamOptions(model=str(base), data_dir=str(train_dir), val_dir=str(val_dir), box_jitter=0.1))
    train_set = task.build(TrainingArguments(output_dir="unused", rank=4, mixed_precision="no"), None).train_dataset
    pixels, box, mask, valid = task.val_set[0]
    height = round(40 * SAM_IMAGE / 48)
    assert pixels.shape == (3, SAM_IMAGE, SAM_IMAGE) and mask.shape == valid.shape == (SAM_IMAGE, SAM_IMAGE)
    assert valid[:height].all() and not valid[height:].any()  # aspect ratio kept, bottom padded
    assert not pixels[:, height:].any() and not mask[height:].any()
    # What SAM's own processor gives for the same image (what users feed the adapted model at inference).
    image_path, mask_path = task.val_set.pairs[0]
    reference = SamProcessor(image_processor=task.val_set.processor)(images=Image.open(image_path), return_tensors="pt")
    torch.testing.assert_close(pixels, reference["pixel_values"][0])
    assert reference["reshaped_input_sizes"][0].tolist() == [height, SAM_IMAGE]
    source = np.asarray(Image.open(mask_path)) > 0
    torch.testing.assert_close(box[0], box_from_mask(mask))  # validation boxes are exact, in the input frame
    assert abs(box[0, 2] - box[0, 0] - (source.any(0).sum() * SAM_IMAGE / 48)) <= 1.5  # width scaled, not squashed
    exact = box_from_mask(train_set[0][2])
    side = (exact[2:] - exact[:2]).repeat(2)
    jittered = torch.stack([train_set[0][1][0] for _ in range(5)])
    assert not torch.equal(jittered[0], jittered[1])  # a new draw each time (the engine seeds each sample's draw)
    assert ((jittered - exact).abs() <= 0.1 * side + 1e-5).all()
    assert (jittered >= 0).all() and (jittered[:, [0, 2]] <= SAM_IMAGE).all() and (jittered[:, [1, 3]] <= height).all()


def test_the_loss_ignores_the_padding():
    target = _mask("##.. ##.. .... ....").float()[None]
    valid = _mask("#### #### .... ....").float()[None]
    logits = (target * 2 - 1) * 30
    spoiled = logits.clone()
    spoiled[0, 2:] = 30.0  # confident "object" on the padding only
    torch.testing.assert_close(dice_bce_loss(spoiled, target, valid), dice_bce_loss(logits, target, valid))
    assert dice_bce_loss(spoiled, target) > dice_bce_loss(logits, target) + 1  # counted without `valid`
