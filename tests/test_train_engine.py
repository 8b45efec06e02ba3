"""The training engine: resume == uninterrupted, crash-safe checkpoints, accumulation, LoRA+, methods, sampler."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import timm
import timm_plugin  # noqa: F401
from serial_lora_train import engine
from serial_lora_train.data import EpochBatchSampler, few_shot_indices
from serial_lora_train.engine import Task, TaskSetup, TrainingArguments, list_checkpoints, train
from serial_lora_train.methods import apply_method, parameter_groups

TINY = {"img_size": 16, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 3}


class NoisyImages(torch.utils.data.Dataset):
    """Fixed images plus fresh random noise per access: exercises the per-sample seeding of augmentations."""

    def __init__(self, n: int = 20) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 16, 16, generator=generator)
        self.labels = torch.arange(n) % 3

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index] + 0.1 * torch.randn(3, 16, 16), self.labels[index]


class TinyTask(Task):
    """A 2-block timm ViT; `crash_at` raises inside the loss at that micro-step, as a killed run would stop."""

    name = "tiny"

    def __init__(self, crash_at: int | None = None, architecture: str = "vit_base_patch16_224") -> None:
        self.crash_at, self.calls, self.architecture = crash_at, 0, architecture

    def build(self, args, accelerator):
        torch.manual_seed(0)
        model = timm.create_model(self.architecture, **TINY)
        model, self.info = apply_method(model, args.method, rank=args.rank, dropout=args.dropout,
                                        trainable_modules=("head",))
        return TaskSetup(model, NoisyImages())

    def loss(self, model, batch):
        self.calls += 1
        if self.crash_at is not None and self.calls > self.crash_at:
            raise KeyboardInterrupt("simulated kill")
        images, labels = batch
        return F.cross_entropy(model(images), labels)

    def save(self, model, output_dir: Path) -> Path:
        path = output_dir / "trained.safetensors"
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in engine.trainable_state(model).items()}, str(path))
        return path


def args_for(out: Path, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(out), rank=4, dropout=0.25, train_batch_size=4, gradient_accumulation_steps=2,
                    learning_rate=3e-3, lora_plus_ratio=4.0, lr_scheduler="cosine", lr_warmup_steps=2,
                    max_train_steps=7, checkpointing_steps=2, mixed_precision="no", disable_progress_bar=True, seed=3)
    return TrainingArguments(**{**settings, **overrides})


@pytest.mark.parametrize("method", ["serial", "lora"])
def test_a_run_killed_mid_training_and_resumed_equals_an_uninterrupted_run(method, tmp_path):
    full = train(TinyTask(), args_for(tmp_path / "full", method=method))
    out = tmp_path / "killed"
    # 7 steps x 2 micro-batches; 20 samples = 5 batches per epoch, so the kill and the resume fall mid-epoch.
    with pytest.raises(KeyboardInterrupt):
        train(TinyTask(crash_at=9), args_for(out, method=method))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    resumed = train(TinyTask(), args_for(out, method=method, resume_from_checkpoint="latest"))
    assert resumed.global_step == full.global_step == 7
    a, b = load_file(str(full.adapter_path)), load_file(str(resumed.adapter_path))
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    logged = [json.loads(line) for line in (out / engine.METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4, 5, 6, 7]  # 1-4 before the kill, 5-7 after


def test_checkpoints_hold_only_trainable_parameters_and_the_limit_keeps_the_newest(tmp_path):
    out = tmp_path / "run"
    result = train(TinyTask(), args_for(out, max_train_steps=6, checkpoints_total_limit=2))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    saved = load_file(str(out / "checkpoints" / "checkpoint-6" / "trainable.safetensors"))
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert set(saved) == trainable and not any("blocks.0.attn.qkv.weight" == k for k in saved)
    state = json.loads((out / "checkpoints" / "checkpoint-6" / "state.json").read_text())
    assert state["global_step"] == 6 and state["data_position"] == 12


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "run"
    original = engine._write_json

    def failing(path: Path, obj) -> None:
        if path.name == "state.json" and obj.get("global_step") == 4:
            raise OSError("disk full (simulated)")
        original(path, obj)

    monkeypatch.setattr(engine, "_write_json", failing)
    with pytest.raises(OSError, match="disk full"):
        train(TinyTask(), args_for(out))
    monkeypatch.setattr(engine, "_write_json", original)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    resumed = train(TinyTask(), args_for(out, resume_from_checkpoint="latest"))
    full = train(TinyTask(), args_for(tmp_path / "full"))
    a, b = load_file(str(full.adapter_path)), load_file(str(resumed.adapter_path))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the half-written folder was replaced


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    # 2 steps: 16 of the 20 samples, the same 16 in both (the epochs of the two batch sizes are padded differently).
    common = dict(dropout=0.0, lora_plus_ratio=None, checkpointing_steps=0, max_train_steps=2, max_grad_norm=None,
                  lr_scheduler="constant", lr_warmup_steps=0)
    accumulated = train(TinyTask(), args_for(tmp_path / "a", train_batch_size=4, gradient_accumulation_steps=2, **common))
    big = train(TinyTask(), args_for(tmp_path / "b", train_batch_size=8, gradient_accumulation_steps=1, **common))
    a, b = load_file(str(accumulated.adapter_path)), load_file(str(big.adapter_path))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    initial = TinyTask().build(args_for(tmp_path / "c"), None).model
    assert not torch.equal(a["head.weight"], initial.head.weight)  # it did train


def test_resume_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="is not a checkpoint folder"):
        train(TinyTask(), args_for(tmp_path / "run", resume_from_checkpoint=str(tmp_path)))


@pytest.mark.parametrize("field, value, message", [
    ("rank", 0, "rank must be a positive integer, got 0"),
    ("train_batch_size", 0, "train_batch_size must be a positive integer"),
    ("gradient_accumulation_steps", 0, "gradient_accumulation_steps must be a positive integer"),
    ("max_train_steps", -1, "max_train_steps must be a positive integer, got -1"),
    ("checkpointing_steps", -2, "checkpointing_steps must be an integer >= 0, got -2"),
    ("checkpoints_total_limit", 0, "checkpoints_total_limit must be >= 1"),
    ("learning_rate", 0.0, "learning_rate must be positive"),
    ("lora_plus_ratio", 0.0, "lora_plus_ratio must be positive"),
    ("alpha", 0.0, r"alpha must be positive \(scaling = alpha/rank"),   # would train nothing
    ("alpha", -4.0, "alpha must be positive"),
])
def test_bad_training_arguments_are_refused_naming_the_argument(field, value, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        args_for(tmp_path / "run", **{field: value})
    assert not (tmp_path / "run").exists()


def test_resume_says_which_checkpoint_it_continues_or_that_there_was_none(tmp_path, capsys):
    out = tmp_path / "run"
    train(TinyTask(), args_for(out, max_train_steps=2, resume_from_checkpoint="latest"))  # as diffusers: starts fresh
    assert "resume_from_checkpoint='latest': no checkpoint in" in capsys.readouterr().err
    train(TinyTask(), args_for(out, max_train_steps=3, resume_from_checkpoint="latest"))
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-2'} (step 2)" in capsys.readouterr().err


@pytest.mark.parametrize(("method", "b_matrices"), [("serial", 2), ("lora", 4)])  # 2 blocks; LoRA: qkv + proj
def test_lora_plus_gives_b_ratio_times_the_learning_rate(method, b_matrices):
    torch.manual_seed(0)
    model, _ = apply_method(timm.create_model("vit_base_patch16_224", **TINY), method, rank=4, trainable_modules=("head",))
    groups = parameter_groups(model, 1e-3, 20.0)
    names = {id(p): n for n, p in model.named_parameters()}
    up_marker = "up" if method == "serial" else "lora_B"
    by_lr: dict[float, set[str]] = {}
    for group in groups:
        by_lr.setdefault(group["lr"], set()).update(names[id(p)] for p in group["params"])
    assert set(by_lr) == {1e-3, 2e-2}
    assert all(up_marker in n for n in by_lr[2e-2]) and len(by_lr[2e-2]) == b_matrices
    assert sum("head" in n for n in by_lr[1e-3]) == 2  # the new head (weight, bias) learns at the base rate
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set().union(*by_lr.values()) == trainable


COUNT_CASES = {
    # architecture: LoRA / Serial at the same rank (fused qkv: PEFT's one A feeds q,k,v; split q,k,v,o: 4 pairs)
    "vit_base_patch16_224": 3,
    "eva02_base_patch14_224": 4,
}


@pytest.mark.parametrize("architecture", list(COUNT_CASES))
def test_lora_has_exactly_3x_or_4x_serial_parameters(architecture):
    kwargs = dict(img_size=28, patch_size=7, depth=2, embed_dim=64, num_heads=2, num_classes=3)
    counts = {}
    for method in ("serial", "lora"):
        torch.manual_seed(0)
        model, info = apply_method(timm.create_model(architecture, **kwargs), method, rank=4)
        counts[method] = info.adapter_parameters
        assert (info.serial_parameters, info.lora_parameters)[method == "lora"] == info.adapter_parameters
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable == info.adapter_parameters  # no trainable_modules: only adapters train
    assert counts["lora"] == COUNT_CASES[architecture] * counts["serial"] == COUNT_CASES[architecture] * 2 * 2 * 4 * 64


def test_epoch_batch_sampler_shards_cover_each_epoch_and_start_mid_epoch():
    shards = [EpochBatchSampler(10, 2, seed=1, num_replicas=2, rank=r) for r in range(2)]
    assert len(shards[0]) == 3  # 10 samples, global batch 4: padded to 12
    batches = [list(s) for s in shards]
    seen = [i for shard in batches for batch in shard for i, epoch in batch]
    assert set(seen) == set(range(10)) and len(seen) == 12
    assert all(epoch == 0 for shard in batches for batch in shard for _, epoch in batch)
    shards[0].set_epoch(1, start=2)
    tail = list(shards[0])
    shards[0].set_epoch(1)
    assert tail == list(shards[0])[2:] and tail[0][0][1] == 1
    assert shards[0].epoch_order(1).tolist() != shards[0].epoch_order(0).tolist()
    # Endless (as the engine uses it): epochs follow each other; a position counts batches from epoch 0.
    def epoch(e: int) -> list:
        one = EpochBatchSampler(10, 2, seed=1, num_replicas=2, rank=0)
        one.set_epoch(e)
        return list(one)

    endless = EpochBatchSampler(10, 2, seed=1, num_replicas=2, rank=0, endless=True)
    endless.set_position(4)  # 3 batches per epoch: epoch 1, batch 1
    assert list(itertools.islice(iter(endless), 5)) == epoch(1)[1:] + epoch(2)


def test_few_shot_draws_n_per_class_reproducibly():
    targets = [0] * 5 + [1] * 7 + [2] * 4
    picked = few_shot_indices(targets, 3, seed=0)
    assert picked == few_shot_indices(targets, 3, seed=0) != few_shot_indices(targets, 3, seed=1)
    assert sorted(targets[i] for i in picked) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="class 'c' has only 4 image"):
        few_shot_indices(targets, 5, seed=0, class_names=["a", "b", "c"])


def test_starting_over_a_run_with_checkpoints_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    train(TinyTask(), args_for(out, max_train_steps=4))
    with pytest.raises(ValueError, match="holds checkpoints of this run; pass --resume-from-checkpoint latest"):
        train(TinyTask(), args_for(out, max_train_steps=4))
    train(TinyTask(), args_for(out, max_train_steps=2, overwrite_output_dir=True))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]  # the old run's checkpoint-4 is gone


def test_runs_with_different_precision_and_accumulation_in_one_process(tmp_path):
    first = train(TinyTask(), args_for(tmp_path / "a", max_train_steps=1, checkpointing_steps=0))
    second = train(TinyTask(), args_for(tmp_path / "b", max_train_steps=1, checkpointing_steps=0,
                                        mixed_precision="bf16", gradient_accumulation_steps=1))
    assert first.global_step == second.global_step == 1
    assert json.loads((tmp_path / "b" / "run.json").read_text())["arguments"]["gradient_accumulation_steps"] == 1


def test_a_trainer_whose_dependency_is_missing_says_what_to_install(monkeypatch, capsys):
    import importlib

    from serial_lora_core import cli

    real = importlib.import_module

    def without_diffusers(name: str, *args):
        if name == "serial_lora_train.sd3":
            raise ModuleNotFoundError("No module named 'diffusers'", name="diffusers")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_diffusers)
    assert cli.main(["train-sd3", "--output-dir", "x"]) == 2
    assert "train-sd3 needs the Python package 'diffusers'" in capsys.readouterr().err
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    assert {"info", "train-classifier", "analyze"} <= set(commands)  # everything else stays registered


def _readme_train_commands() -> list[tuple[str, str]]:
    """(sub-command, command line) of every `serial-lora train-*|analyze` / `-m serial_lora_train.<task>` line
    in README.md's bash blocks (continuation lines joined, comments dropped)."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split("  #")[0]
            match = re.search(r"serial-lora ((?:train-\w+|analyze))\b|-m serial_lora_train\.(\w+)", line)
            if match:
                found.append((match.group(1) or f"train-{match.group(2)}", line.strip()))
    return found


@pytest.mark.parametrize("command, line", _readme_train_commands())
def test_readme_train_commands_use_options_the_command_has(command, line):
    """The README's train/analyze command lines name only options their parser defines (the docs cannot rot)."""
    import argparse
    import re

    from serial_lora_core.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert command in commands, f"README names `serial-lora {command}`, which does not exist"
    own = line.split(" -m ", 1)[1] if " -m " in line else line  # `accelerate launch`'s options come first
    unknown = [f for f in re.findall(r"(?<!\S)--[\w-]+", own) if f not in commands[command]._option_string_actions]
    assert not unknown, f"{line!r}: {unknown}"
