"""`serial-lora train-classifier` on a tiny timm CLIP ViT and tiny image folders written by the tests (CPU, seconds)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import timm
import timm_plugin  # noqa: F401
from conftest import run_card_snippet, train_briefly, write_image_folder
from timm_models import BY_NAME
from serial_lora_core import read_file, save_serial_lora
from serial_lora_core.cli import main as cli_main
from serial_lora_train.classifier import ADAPTER_FILE, PEFT_DIR, ClassifierOptions, ClassifierTask, Normalize
from serial_lora_train.engine import METRICS_FILE
from serial_lora_train.methods import apply_method

ARCH = "vit_base_patch16_clip_224"
TINY = {"img_size": 16, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
FAST = ["--rank", "4", "--train-batch-size", "6", "--learning-rate", "5e-3", "--no-augment",
        "--disable-progress-bar", "--mixed-precision", "no"]


@pytest.fixture
def base_file(tmp_path: Path) -> Path:
    """Base weights of the tiny ViT (random init, 1000-class head), as `--pretrained-file` takes them."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, **TINY)
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def cli_args(train_dir: Path, out: Path, base: Path, *extra: str, val_dir: Path | None = None) -> list[str]:
    args = ["train-classifier", "--model", ARCH, "--model-kwargs", json.dumps(TINY), "--pretrained-file", str(base),
            "--train-dir", str(train_dir), "--output-dir", str(out), *FAST, *extra]
    return args + (["--val-dir", str(val_dir)] if val_dir else [])


def test_train_lowers_loss_and_the_file_rebuilds_the_classifier(image_folders, base_file, tmp_path):
    train_dir, val_dir = image_folders
    out = tmp_path / "out"
    task = ClassifierTask(ClassifierOptions(model=ARCH, train_dir=str(train_dir), val_dir=str(val_dir),
                                            pretrained_file=str(base_file), model_kwargs=TINY, augment=False))
    result, losses = train_briefly(task, out, train_batch_size=6, learning_rate=5e-3, max_train_steps=12,
                                   dropout=0.25)  # the engine default, as this test always ran
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert result.adapter_path == out / ADAPTER_FILE
    assert set(result.metrics) == {"val_loss", "top1"}
    # The file carries the new 3-class head: timm rebuilds the trained classifier from it alone.
    assert read_file(result.adapter_path).modules_to_save["head.weight"].shape == (3, 32)
    rebuilt = timm.create_model(f"{ARCH}.serial_lora", pretrained=True, pretrained_cfg_overlay=dict(file=str(base_file)),
                                serial_lora_weights=str(result.adapter_path), **TINY).eval()
    assert rebuilt.num_classes == 3
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), result.model.eval().cpu()(images), rtol=1e-5, atol=1e-5)
    card = (out / "README.md").read_text()
    for fact in (ARCH, "base.safetensors", "Serial LoRA", "adapter parameters", "512", "top1", "18 training images"):
        assert fact in card
    assert "top1" in result.summary and "trainable parameters" in result.summary


def test_an_explicit_num_classes_contradicting_the_file_is_refused(image_folders, base_file, tmp_path):
    train_dir, _ = image_folders
    out = tmp_path / "out"
    assert cli_main(cli_args(train_dir, out, base_file, "--max-train-steps", "1")) == 0
    with pytest.raises(ValueError, match="num_classes=5 contradicts .* 3 classes"):
        timm.create_model(f"{ARCH}.serial_lora", num_classes=5, serial_lora_weights=str(out / ADAPTER_FILE),
                          pretrained=True, pretrained_cfg_overlay=dict(file=str(base_file)), **TINY)


def test_method_lora_uses_peft_with_three_times_the_parameters(image_folders, base_file, tmp_path, capsys):
    train_dir, _ = image_folders
    rc = cli_main(cli_args(train_dir, tmp_path / "lora", base_file, "--method", "lora", "--max-train-steps", "2",
                           "--lora-plus-ratio", "20"))
    assert rc == 0
    summary = capsys.readouterr().out
    config = json.loads((tmp_path / "lora" / PEFT_DIR / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["modules_to_save"] == ["head"]
    # Serial: 2·r·d per block (2 blocks); LoRA: r·(in+out) on qkv (32->96) and proj (32->32).
    serial = 2 * 2 * 4 * 32
    lora = 2 * 4 * ((32 + 96) + (32 + 32))
    assert lora == 3 * serial
    assert f"adapter parameters    {lora:,}" in summary
    assert f"LoRA {lora:,} = 3x Serial {serial:,}: PEFT shares A across q,k,v on a fused qkv+proj" in summary
    assert re.search(r"^method\s+LoRA \(PEFT, qkv,proj\)$", summary, re.M), summary  # what ran, not q,k,v,o


@pytest.mark.parametrize("method", ["serial", "lora"])
def test_the_model_cards_snippet_runs_as_written_and_rebuilds_the_trained_classifier(
        method, image_folders, base_file, tmp_path, monkeypatch):
    train_dir, _ = image_folders
    out = tmp_path / method
    task = ClassifierTask(ClassifierOptions(model=ARCH, train_dir=str(train_dir), pretrained_file=str(base_file),
                                            model_kwargs=TINY, augment=False))
    result, _ = train_briefly(task, out, method=method, train_batch_size=6, learning_rate=5e-3, max_train_steps=2)
    card = (out / "README.md").read_text()
    assert "no --val-dir, so no validation loss or top-1 was measured" in card  # said, not left out silently
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert str(base_file) in snippet and "img_size=16" in snippet  # the base this run used, not a hub default
    model = run_card_snippet(out, monkeypatch)["model"]
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), result.model.eval().cpu()(images), rtol=1e-5, atol=1e-5)


def _corrupt(folder: Path) -> Path:
    bad = folder / "red" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return bad


def _missing(train: Path, val: Path) -> tuple[Path, Path, list[str]]:
    return train.parent / "nope", val, []


def _no_classes(train: Path, val: Path) -> tuple[Path, Path, list[str]]:
    (train.parent / "empty").mkdir()
    return train.parent / "empty", val, []


def _class_without_images(train: Path, val: Path) -> tuple[Path, Path, list[str]]:
    (train / "purple").mkdir()
    return train, val, []


def _corrupt_image(train: Path, val: Path) -> tuple[Path, Path, list[str]]:
    _corrupt(train)
    return train, val, []


def _val_with_other_classes(train: Path, val: Path) -> tuple[Path, Path, list[str]]:
    write_image_folder(val, {"extra": 1})
    return train, val, []


def _corrupt_base(train: Path, val: Path) -> tuple[Path, Path, list[str]]:
    (train.parent / "corrupt.safetensors").write_bytes(b"not a safetensors file")
    return train, val, ["--pretrained-file", str(train.parent / "corrupt.safetensors")]


def _with(*extra: str):
    return lambda train, val: (train, val, list(extra))


BAD_INPUTS = {
    "missing train folder": (_missing, "--train-dir=.*nope.* does not exist"),
    "no class folders": (_no_classes, "has no class sub-folders"),
    "class without images": (_class_without_images, r"class folder\(s\) \['purple'\] hold no image"),
    "corrupt image": (_corrupt_image, r"1 unreadable image\(s\): .*broken.png"),
    "rank above width": (_with("--rank", "64"), "rank 64 is larger than the width 32"),
    "val classes differ": (_val_with_other_classes, "--val-dir classes .* differ"),
    "too few images for shots": (_with("--shots", "7"), "--shots 7: class 'blue' has only 6 image"),
    "not a plugin architecture": (_with("--model", "resnet18"), "not an architecture of the timm plugin"),
    "bad learning rate": (_with("--learning-rate", "0"), "learning_rate must be positive"),
    "unreadable base weights": (_corrupt_base, r"--pretrained-file '.*corrupt.safetensors' is not readable as "
                                               r"weights \(SafetensorError: .*\); pass a .safetensors"),
    "base weights of another shape": (_with("--model-kwargs", json.dumps({**TINY, "embed_dim": 48})),
                                      r"--pretrained-file '.*base.safetensors' does not fit --model .*pass the "
                                      r"architecture and the --model-kwargs"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_is_refused_before_training(case, image_folders, base_file, tmp_path, capsys):
    make, message = BAD_INPUTS[case]
    train_dir, val_dir, extra = make(*image_folders)
    out = tmp_path / "out"
    rc = cli_main(cli_args(train_dir, out, base_file, "--max-train-steps", "1", *extra, val_dir=val_dir))
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("serial-lora: error: ")
    assert re.search(message, err), err
    assert not out.exists()  # nothing was written


def test_timms_weights_that_cannot_be_downloaded_give_one_line_saying_what_to_do(image_folders, tmp_path, capsys,
                                                                                monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")

    monkeypatch.setattr(timm, "create_model", offline)  # as timm fails with --pretrained and no network
    train_dir, _ = image_folders
    args = ["train-classifier", "--model", ARCH, "--pretrained", "--train-dir", str(train_dir),
            "--output-dir", str(tmp_path / "out"), *FAST]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"serial-lora: error: --pretrained: timm's weights of '{ARCH}' could not be downloaded "
                          "(OSError: We couldn't connect") and "--pretrained-file PATH" in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_skip_bad_images_trains_and_counts_them(image_folders, base_file, tmp_path, capsys):
    train_dir, _ = image_folders
    _corrupt(train_dir)
    assert cli_main(cli_args(train_dir, tmp_path / "out", base_file, "--max-train-steps", "1", "--skip-bad-images")) == 0
    assert "skipped bad images    1" in capsys.readouterr().out


def test_a_folder_holding_another_run_is_refused_unless_overwrite(image_folders, base_file, tmp_path, capsys):
    train_dir, _ = image_folders
    out = tmp_path / "out"
    assert cli_main(cli_args(train_dir, out, base_file, "--max-train-steps", "1")) == 0
    assert cli_main(cli_args(train_dir, out, base_file, "--max-train-steps", "1", "--rank", "8")) == 2
    assert "holds a different run (arguments.rank: 4 there, 8 now)" in capsys.readouterr().err
    assert read_file(out / ADAPTER_FILE).rank == 4  # untouched
    assert cli_main(cli_args(train_dir, out, base_file, "--max-train-steps", "1", "--rank", "8",
                             "--overwrite-output-dir")) == 0
    assert read_file(out / ADAPTER_FILE).rank == 8


def test_two_process_accelerate_launch_writes_one_file(image_folders, base_file, tmp_path):
    train_dir, _ = image_folders
    out = tmp_path / "ddp"
    args = cli_args(train_dir, out, base_file, "--max-train-steps", "2", "--train-batch-size", "3")[1:]
    # GPUs hidden, `--multi_gpu`: two CPU processes in a gloo group (accelerate's `--cpu` would run one; on a machine
    # with one GPU both ranks would otherwise share it, which NCCL refuses).
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
              "serial_lora_train.classifier", *args]
    done = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trainable parameters") == 1  # only the main process prints
    assert re.search(r"^processes\s+2$", done.stdout, re.M), done.stdout  # both trained, in one group
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", ADAPTER_FILE, METRICS_FILE, "run.json"])
    steps = [json.loads(line)["step"] for line in (out / METRICS_FILE).read_text().splitlines()]
    assert steps == [1, 2]


def test_benchmark_smoke_mode_runs_both_sections(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_classifier.py"
    done = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)], capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "train_classifier.json").read_text())
    assert set(results["memory"]["ratios"]) == {"trainer_memory_serial_over_bare_serial",
                                                "trainer_memory_lora_over_bare_serial"}
    assert set(results["jpeg"]["ratios"]) == {"trainer_jpeg_serial_over_bare_serial",
                                              "trainer_jpeg_serial_augment_over_bare_serial"}
    assert all(ratio > 0 for ratio in results["jpeg"]["ratios"].values())
    memory = results["memory"]
    assert memory["trainer_memory_lora"]["trainable_parameters"] > memory["trainer_memory_serial"]["trainable_parameters"]


LAUNCH_MODES = {
    "ddp": ["--multi_gpu"],
    "fsdp": ["--use_fsdp", "--fsdp_version", "1", "--fsdp_use_orig_params", "true", "--fsdp_auto_wrap_policy",
             "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap", "Block"],
}


@pytest.mark.multigpu
@pytest.mark.parametrize("mode", list(LAUNCH_MODES))
def test_two_gpus_train_and_write_one_loadable_file(mode, image_folders, base_file, tmp_path):
    """DDP and FSDP (frozen base + trainable adapters through use_orig_params) on 2 GPUs; run with -m multigpu."""
    train_dir, val_dir = image_folders
    out = tmp_path / mode
    args = cli_args(train_dir, out, base_file, "--max-train-steps", "3", "--train-batch-size", "3",
                    val_dir=val_dir)[1:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "bf16", "--dynamo_backend", "no", *LAUNCH_MODES[mode], "-m",
              "serial_lora_train.classifier", *args]
    done = subprocess.run(launch, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", ADAPTER_FILE, METRICS_FILE, "run.json"])
    rebuilt = timm.create_model(f"{ARCH}.serial_lora", pretrained=True, pretrained_cfg_overlay=dict(file=str(base_file)),
                                serial_lora_weights=str(out / ADAPTER_FILE), **TINY).eval()
    adapted = read_file(out / ADAPTER_FILE)
    assert rebuilt.num_classes == 3 and len(adapted.attentions) == 2
    assert any(pair.up.abs().sum() > 0 for pair in adapted.weights.values())  # it trained


@pytest.mark.parametrize("family", ["clip_vit", "deit_distilled", "eva02_split_qkv", "beit"])
def test_the_timm_tag_rebuilds_a_trained_head_of_any_family(family, tmp_path):
    """The file's head (both heads of a distilled DeiT) gives the class count; the logits are reproduced."""
    spec = BY_NAME[family]
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in spec.create(tag=False).state_dict().items()}, str(base))
    overlay = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(base)), **spec.overrides)
    trained = timm.create_model(spec.architecture, num_classes=5, **overlay)
    heads = trained.pretrained_cfg["classifier"]
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    trained, _ = apply_method(trained, "serial", rank=4, trainable_modules=heads)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (p for p in trained.parameters() if p.requires_grad):
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    path = save_serial_lora(trained, tmp_path / "a.safetensors", architecture=spec.architecture, modules_to_save=heads)
    rebuilt = timm.create_model(f"{spec.architecture}.serial_lora", serial_lora_weights=str(path), **overlay).eval()
    assert rebuilt.num_classes == 5
    images = spec.images()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), trained.eval()(images))


@pytest.mark.parametrize("name, custom_load, classes", [
    ("base.safetensors", False, 7),  # a state dict, whatever format the architecture's hub weights have
    ("base.pth", False, None),       # not safetensors: the head size is not read, timm reads the file
    ("base.npz", True, None),        # timm's JAX format: its own loader
])
def test_local_base_weights_tell_timm_their_format_and_head_size(name, custom_load, classes, tmp_path, monkeypatch):
    """vit_tiny's hub weights are .npz (custom_load=True); timm < 1.0.31 kept that loader for a local file."""
    import timm as timm_module

    from serial_lora_train.classifier import create_timm_model

    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file({"head.weight": torch.zeros(7, 4), "head.bias": torch.zeros(7)}, str(path))
    else:
        path.write_bytes(b"PK\x03\x04 another container format")  # what timm itself reads (torch.save, numpy)
    seen = {}
    monkeypatch.setattr(timm_module, "create_model", lambda model, **kwargs: seen.update(kwargs) or "built")
    assert create_timm_model("vit_tiny_patch16_224", pretrained=False, pretrained_file=str(path), model_kwargs={}) == "built"
    overlay = seen["pretrained_cfg_overlay"]
    assert seen["pretrained"] and overlay["file"] == str(path) and overlay["custom_load"] is custom_load
    assert overlay.get("num_classes") == classes


def test_device_normalisation_matches_timms_float_transform(image_folders):
    """uint8 transform (timm's use_prefetcher) + `Normalize` on the device == timm's normalising transform."""
    from PIL import Image
    from timm.data import create_transform

    train_dir, _ = image_folders
    task = ClassifierTask(ClassifierOptions(model=ARCH, train_dir=str(train_dir), model_kwargs=TINY))
    config = task.data_config(timm.create_model(ARCH, **TINY))
    image = Image.open(next((train_dir / "red").iterdir())).convert("RGB")
    expected = create_transform(**config, is_training=False)(image)
    ours = Normalize(config["mean"], config["std"])(task.transform(config, training=False)(image)[None])[0]
    assert ours.shape == expected.shape == (3, 16, 16)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_a_process_killed_with_sigkill_resumes_to_the_uninterrupted_adapter(image_folders, base_file, tmp_path):
    """A real `serial-lora train-classifier` process is SIGKILLed after a checkpoint, then resumed."""
    train_dir, _ = image_folders
    steps = ["--checkpointing-steps", "2", "--dropout", "0.25"]
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "serial_lora_train.classifier",
               *cli_args(train_dir, killed, base_file, "--max-train-steps", "100000", *steps)[1:]]
    process = subprocess.Popen(command, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "checkpoint-4").is_dir() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    # checkpoint-4 (a later one may exist too, or be half-written: the kill time is not exact).
    assert cli_main(cli_args(train_dir, killed, base_file, "--max-train-steps", "8", *steps,
                             "--resume-from-checkpoint", str(killed / "checkpoints" / "checkpoint-4"))) == 0
    full = tmp_path / "full"
    assert cli_main(cli_args(train_dir, full, base_file, "--max-train-steps", "8", *steps)) == 0
    a, b = read_file(full / ADAPTER_FILE), read_file(killed / ADAPTER_FILE)
    for key, pair in a.weights.items():
        assert torch.equal(pair.down, b.weights[key].down) and torch.equal(pair.up, b.weights[key].up)
    assert all(torch.equal(t, b.modules_to_save[k]) for k, t in a.modules_to_save.items())
