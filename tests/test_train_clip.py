"""`serial-lora train-clip`: CLIP prompt classification on tiny transformers / open_clip models (CPU, seconds)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import run_card_snippet, train_briefly, write_image_folder
from transformers import CLIPModel

import transformers_plugin as tp
from hf_tiny import CLIP_IMAGE, clip_tokenizer, save_tiny_clip_folder, tiny_clip, tiny_open_clip
from serial_lora_core import read_file, serial_lora_modules, serial_lora_parameters
from serial_lora_core.cli import main as cli_main
from serial_lora_train.clip import ADAPTER_FILE, PEFT_DIR, ClipOptions, ClipTask, class_prompts, clip_logits

CLASSES = ("red", "green", "blue")
FAST = ["--rank", "4", "--train-batch-size", "6", "--learning-rate", "1e-2", "--dropout", "0",
        "--disable-progress-bar", "--mixed-precision", "no"]
OPEN_CLIP_TINY = "serial-lora-test-tiny"


@pytest.fixture
def clip_data(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(base model folder, train folder, val folder): a tiny CLIP and three colour classes."""
    return (save_tiny_clip_folder(tmp_path / "base"),
            write_image_folder(tmp_path / "train", dict.fromkeys(CLASSES, 6), seed=0),
            write_image_folder(tmp_path / "val", dict.fromkeys(CLASSES, 2), seed=1))


@pytest.fixture
def open_clip_tiny(tmp_path: Path) -> str:
    """Register a tiny open_clip model config (open_clip reads model configs from JSON files)."""
    import open_clip

    folder = tmp_path / "open_clip_configs"
    folder.mkdir()
    config = {"embed_dim": 16, "vision_cfg": {"image_size": CLIP_IMAGE, "layers": 2, "width": 32, "head_width": 16,
                                               "patch_size": 8},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 24, "heads": 2, "layers": 2}}
    (folder / f"{OPEN_CLIP_TINY}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return f"open_clip:{OPEN_CLIP_TINY}"


def test_class_folder_names_become_prompts():
    assert class_prompts(["golden_retriever", "cat"], "a photo of a {}.") == ["a photo of a golden retriever.",
                                                                             "a photo of a cat."]


@pytest.mark.parametrize("library", ["transformers", "open_clip"])
def test_prompt_classifier_logits_equal_the_hand_computation(library):
    images = torch.randn(3, 3, CLIP_IMAGE, CLIP_IMAGE, generator=torch.Generator().manual_seed(0))
    if library == "transformers":
        model = tiny_clip()
        tokens = clip_tokenizer()(class_prompts(list(CLASSES), "a photo of a {}."), padding=True, return_tensors="pt")
        prompts = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
        with torch.no_grad():
            image = model.get_image_features(pixel_values=images).pooler_output
            text = model.get_text_features(**prompts).pooler_output
    else:
        model = tiny_open_clip()
        prompts = {"input_ids": torch.arange(24).reshape(3, 8) % 50}
        with torch.no_grad():
            image, text = model.encode_image(images), model.encode_text(prompts["input_ids"])
    expected = model.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    with torch.no_grad():
        got = clip_logits(model, images, prompts, library)
    assert got.shape == (3, 3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["serial", "lora"])
def test_training_lowers_the_loss_and_reports_zero_shot_before_and_few_shot_after(method, clip_data, tmp_path,
                                                                                   monkeypatch):
    base, train_dir, val_dir = clip_data
    out = tmp_path / "out"
    task = ClipTask(ClipOptions(model=str(base), train_dir=str(train_dir), val_dir=str(val_dir), shots=4))
    result, losses = train_briefly(task, out, method, train_batch_size=6, learning_rate=1e-2, max_train_steps=8)
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2])
    assert len(task.indices) == 4 * len(CLASSES)  # N-shot per class
    assert set(result.metrics) == {"top1", "val_loss", "zero_shot_top1", "zero_shot_val_loss"}
    assert result.metrics["val_loss"] < result.metrics["zero_shot_val_loss"]
    assert "zero shot top1" in result.summary and "LoRA 5,120 = 4x Serial 1,280" in result.summary
    images = torch.randn(2, 3, CLIP_IMAGE, CLIP_IMAGE, generator=torch.Generator().manual_seed(5))
    prompts = {k: v for k, v in task.tokens.items()}
    trained = result.model.eval().cpu()  # trained on a GPU where there is one; compared on the CPU
    if method == "lora":
        assert (out / PEFT_DIR / "adapter_config.json").is_file()
        from_card = run_card_snippet(out, monkeypatch)["model"].eval()  # PEFT's folder, as the card loads it
        with torch.no_grad():
            torch.testing.assert_close(clip_logits(from_card, images, prompts, "transformers"),
                                       clip_logits(trained, images, prompts, "transformers"), rtol=1e-5, atol=1e-6)
        return
    adapter = read_file(out / ADAPTER_FILE)
    assert json.loads(adapter.metadata["towers"]) == ["text", "vision"]
    assert json.loads(adapter.metadata["class_names"]) == sorted(CLASSES)
    assert adapter.metadata["prompt_template"] == "a photo of a {}."
    # The file reloads onto the base model and reproduces the trained prompt classifier.
    reloaded = tp.from_pretrained(base, out / ADAPTER_FILE, CLIPModel).eval()
    with torch.no_grad():
        torch.testing.assert_close(clip_logits(reloaded, images, prompts, "transformers"),
                                   clip_logits(trained, images, prompts, "transformers"), rtol=1e-5, atol=1e-6)
    # So does the model card's snippet, run as written from the folder holding it.
    scope = run_card_snippet(out, monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(clip_logits(scope["model"].eval(), images, prompts, "transformers"),
                                   clip_logits(trained, images, prompts, "transformers"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["serial", "lora"])
def test_cli_trains_an_open_clip_model_and_the_file_reloads(method, open_clip_tiny, clip_data, tmp_path, capsys,
                                                          monkeypatch):
    _, train_dir, _ = clip_data
    out = tmp_path / "oc"
    rc = cli_main(["train-clip", "--model", open_clip_tiny, "--train-dir", str(train_dir), "--shots", "4",
                   "--output-dir", str(out), "--max-train-steps", "2", *FAST, "--method", method])
    assert rc == 0, capsys.readouterr().err
    summary = capsys.readouterr().out
    assert "zero shot top1" in summary and re.search(r"\btop1\s+\d", summary)
    assert re.search(r"LoRA [\d,]+ = 3x Serial", summary), summary  # packed q,k,v: PEFT shares A across them
    import open_clip

    rebuilt = run_card_snippet(out, monkeypatch)["model"]  # the card builds the open_clip model, loads the file
    if method == "lora":  # PEFT's LoRA for nn.MultiheadAttention, trained and reloaded from PEFT's folder
        from peft import PeftModel

        assert isinstance(rebuilt, PeftModel) and (out / PEFT_DIR / "adapter_config.json").is_file()
        lora_b = [p for n, p in rebuilt.named_parameters() if "lora_B" in n]
        assert len(lora_b) == 8 and all(p.abs().sum() > 0 for p in lora_b)  # in_proj + out_proj x 4 attentions
        return
    model = open_clip.create_model(OPEN_CLIP_TINY)
    adapter = tp.load_serial_lora(model, out / ADAPTER_FILE)
    assert len(adapter.attentions) == 4 and json.loads(adapter.metadata["towers"]) == ["text", "vision"]
    assert len(list(serial_lora_modules(rebuilt))) == 4
    loaded, again = list(serial_lora_parameters(model)), list(serial_lora_parameters(rebuilt))
    assert len(loaded) == len(again) == 8 and all(torch.equal(a, b) for a, b in zip(loaded, again))


@pytest.mark.parametrize("shots, held_out", [("4", "6"), ("6", "none (pass --val-dir)")])
def test_the_summary_and_card_say_how_many_images_were_held_out(shots, held_out, clip_data, tmp_path, capsys):
    """Without --val-dir the held-out split is the images not drawn as shots; when --shots takes them all, the
    summary and the card say that no accuracy was measured instead of leaving it unsaid."""
    base, train_dir, _ = clip_data
    out = tmp_path / "out"
    assert cli_main(["train-clip", "--model", str(base), "--train-dir", str(train_dir), "--shots", shots,
                     "--output-dir", str(out), "--max-train-steps", "1", *FAST]) == 0
    summary = capsys.readouterr().out
    assert re.search(rf"^held-out images\s+{re.escape(held_out)}$", summary, re.M), summary
    assert ("zero shot top1" in summary) == (shots == "4")
    card = (out / "README.md").read_text()
    assert ("held-out: 6 images, the training images not drawn" in card) == (shots == "4")
    assert ("held-out: none, so no zero-/few-shot accuracy" in card) == (shots == "6")


@pytest.mark.parametrize("extra, message", [
    (["--template", "a photo"], r"--template 'a photo' must contain exactly one '\{\}'"),
    (["--towers", "audio"], r"--towers 'audio': choose from vision,text"),
    (["--shots", "9"], r"--shots 9: class 'blue' has only 6 image\(s\)"),
    (["--model", "/nonexistent/clip"], r"--model '/nonexistent/clip': cannot load a CLIP model"),
    (["--model", "open_clip:no-such-model"], r"open_clip has no model 'no-such-model'"),
])
def test_bad_inputs_exit_2_with_one_clear_line_and_write_nothing(extra, message, clip_data, tmp_path, capsys):
    base, train_dir, _ = clip_data
    out = tmp_path / "bad"
    args = ["train-clip", "--model", str(base), "--train-dir", str(train_dir), "--output-dir", str(out),
            "--max-train-steps", "1", *FAST, *extra]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("serial-lora: error: ") and re.search(message, err), err
    assert not (out / ADAPTER_FILE).exists()
