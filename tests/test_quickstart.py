"""The quick start (examples/finetune_vit.py, what `bash scripts/quickstart.sh` runs), on a few steps:
held-out evaluation, a fair PEFT baseline, the parameter ratio of what ran, an honest summary."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import tomllib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
_spec = importlib.util.spec_from_file_location("finetune_vit", ROOT / "examples" / "finetune_vit.py")
finetune_vit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(finetune_vit)

FEW_STEPS = ["--pretrain-steps", "4", "--max-train-steps", "4", "--train-batch-size", "16", "--rank", "4"]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("quickstart")
    return finetune_vit.main([*FEW_STEPS, "--seeds", "0", "1", "--output-dir", str(out)])


def test_report_is_written_and_reload_and_merge_agree(report):
    on_disk = json.loads((Path(report["adapter_file"]).parent / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert report["reloaded_outputs_identical"] is True
    assert report["merged_max_abs_difference"] < 1e-4
    assert report["file_info"]["architecture"] == "vit_base_patch16_clip_224"


def test_parameter_ratio_is_of_the_methods_that_ran(report):
    """Serial: 2*d*r per block; PEFT on fused qkv (4*d*r, A shared by q, k, v) + proj (2*d*r): 3x."""
    blocks, width, rank = finetune_vit.TINY["depth"], finetune_vit.TINY["embed_dim"], 4
    assert report["serial_lora"]["adapter_parameters"] == blocks * 2 * width * rank
    assert report["peft_lora"]["adapter_parameters"] == blocks * 6 * width * rank
    assert report["parameter_ratio_serial_over_peft"] == pytest.approx(1 / 3)
    assert report["head_only"]["adapter_parameters"] == 0
    head = width * 4 + 4
    assert report["head_only"]["trainable_parameters"] == head
    assert report["serial_lora"]["trainable_parameters"] == blocks * 2 * width * rank + head


def test_summary_states_the_held_out_result_with_its_seeds(report):
    assert report["seeds"] == [0, 1]
    assert set(report["serial_lora"]["heldout_accuracy_per_seed"]) == {"0", "1"}
    assert set(report["serial_lora"]["heldout_accuracy_at_step"]) == {"1", "2", "4"}
    for step, line in zip(("1", "2", "4"), report["summary"].splitlines()):
        assert f"over seeds [0, 1], after {step} steps" in line
        serial = report["serial_lora"]["heldout_accuracy_at_step"][step]
        assert f"Serial LoRA {serial['mean']:.3f} +- {serial['std']:.3f}" in line
    assert "seconds" not in json.dumps(report)  # no single-run wall times


def test_held_out_images_are_not_training_images():
    train, heldout = finetune_vit.synthetic_task(64, True, 1), finetune_vit.synthetic_task(64, True, 2)
    distances = torch.cdist(train[0].flatten(1), heldout[0].flatten(1))
    assert distances.min() > 1.0  # the noise alone makes every pair far apart


def test_peft_baseline_adapts_the_attention_projections_only():
    backbone = finetune_vit.timm.create_model("vit_base_patch16_clip_224", **finetune_vit.TINY)
    model = finetune_vit.peft_lora(backbone, 4, rank=2)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert "patch_embed.proj" not in adapted
    assert adapted == {f"blocks.{i}.attn.{p}" for i in range(4) for p in ("qkv", "proj")}


COMPARISONS = [
    # (serial mean, std, peft mean, std, expected wording)
    (0.90, 0.01, 0.80, 0.02, "Serial LoRA ahead by 0.100, more than one standard deviation (0.020)"),
    (0.80, 0.02, 0.90, 0.01, "PEFT LoRA ahead by 0.100, more than one standard deviation (0.020)"),
    (0.85, 0.05, 0.88, 0.01, "within one standard deviation (0.050) of each other"),
]


@pytest.mark.parametrize(("s_mean", "s_std", "p_mean", "p_std", "wording"), COMPARISONS)
def test_comparison_says_who_leads_whichever_it_is(s_mean, s_std, p_mean, p_std, wording):
    text = finetune_vit.compare({"mean": s_mean, "std": s_std}, {"mean": p_mean, "std": p_std})
    assert text.startswith(f"Serial LoRA {s_mean:.3f} +- {s_std:.3f}, PEFT LoRA {p_mean:.3f} +- {p_std:.3f}: ")
    assert text.endswith(wording)


def test_image_folder_is_split_and_the_random_base_is_shared(image_folders, tmp_path):
    """--data: a held-out share of the folder, and (without --pretrained) one random base for every model,
    so the reloaded adapter still reproduces the trained model."""
    train_dir, _ = image_folders  # 3 classes x 6 images
    report = finetune_vit.main([*FEW_STEPS, "--seeds", "0", "--data", str(train_dir), "--image-size", "16",
                                "--holdout-fraction", "0.25", "--model-kwargs",
                                '{"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}',
                                "--output-dir", str(tmp_path / "out")])
    assert report["reloaded_outputs_identical"] is True
    assert report["serial_lora"]["adapter_parameters"] == 1 * 2 * 32 * 4
    assert report["backbone"] == "random"


def test_image_folder_too_small_to_hold_out_is_refused(image_folders):
    with pytest.raises(ValueError, match="holdout-fraction"):
        finetune_vit.image_folder(str(image_folders[0]), 16, 1.5, seed=0)


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for the venv's Python: records every call, installs nothing.
echo "$*" >> "$FAKE_LOG"
case "$*" in *sysconfig*) echo "$FAKE_SITE" ;; esac
"""


def test_quickstart_setup_installs_only_what_it_needs_once(tmp_path):
    """`setup.sh quickstart`: torch, then the library with [timm] and PEFT only (no ComfyUI, no test tools);
    a second run with unchanged inputs is a no-op (stamped)."""
    venv, log, site = tmp_path / "venv", tmp_path / "calls.log", tmp_path / "site"
    (venv / "bin").mkdir(parents=True)
    site.mkdir()
    (venv / "bin" / "python").write_text(FAKE_PYTHON)
    (venv / "bin" / "python").chmod(0o755)
    env = dict(os.environ, SERIAL_LORA_VENV=str(venv), FAKE_LOG=str(log), FAKE_SITE=str(site))

    def setup() -> list[str]:
        before = log.read_text().splitlines() if log.exists() else []
        subprocess.run(["bash", "scripts/setup.sh", "quickstart"], cwd=ROOT, env=env, check=True,
                       capture_output=True, text=True, timeout=60)
        return (log.read_text().splitlines() if log.exists() else [])[len(before):]

    installs = [call.split(" install ", 1)[1] for call in setup() if " install " in call]
    peft = next(r for r in PYPROJECT["project"]["optional-dependencies"]["train"] if r.startswith("peft"))
    assert installs == ["torch==2.13.0", f"-c constraints.txt -e .[timm] {peft}"]
    assert [p.name.startswith(".serial-lora-setup-base-") for p in venv.iterdir() if p.is_file()] == [True]
    assert setup() == []


@pytest.mark.parametrize("script", ["scripts/setup.sh", "benchmarks/first_hour.sh"])
def test_scripts_refuse_an_unknown_argument_with_their_usage(script):
    result = subprocess.run(["bash", script, "--no-such-option"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "usage: bash " + script in result.stderr and "--no-such-option" in result.stderr
