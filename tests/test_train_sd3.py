"""`serial-lora train-sd3` on a tiny offline SD3 pipeline (tests/sd3_tiny.py saved with save_pretrained).

Covers: the training math against diffusers' own functions, the text embeddings' layout, a few steps
lowering the loss, the saved file reproducing the trained transformer through
`pipe.load_serial_lora_weights`, `--export-lora` through stock `pipe.load_lora_weights`,
`--method lora` (PEFT), validation images, resume == uninterrupted (with gradient checkpointing), the
ComfyUI node loading the trained file (real ComfyUI, in a subprocess), each bad input's message, and
the benchmark's `--smoke` mode.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffusers_loader  # noqa: F401  (adds load_serial_lora_weights to the SD3 pipelines)
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from safetensors.torch import load_file
from conftest import run_card_snippet
from sd3_tiny import tiny_sd3_pipeline, tiny_sd3_transformer, transformer_inputs
from serial_lora_train import sd3
from serial_lora_train.engine import TrainingArguments, train

REPO = Path(__file__).resolve().parents[1]
TINY = ["--resolution", "32", "--max-sequence-length", "16", "--disable-progress-bar", "--seed", "0"]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    """The tiny SD3 pipeline, saved as a local `from_pretrained` folder."""
    folder = tmp_path_factory.mktemp("tiny_sd3")
    tiny_sd3_pipeline().save_pretrained(folder)
    return folder


def write_instance_folder(folder: Path, count: int = 2, captions: dict[int, str] | None = None) -> Path:
    """`count` 40x48 PNGs (so resize + centre crop is exercised) and optional `<name>.txt` captions."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    for i, text in (captions or {}).items():
        (folder / f"img{i}.txt").write_text(text)
    return folder


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory) -> Path:
    return write_instance_folder(tmp_path_factory.mktemp("instance"), 2, {0: "a red cat"})


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sd3.add_arguments(parser)
    return parser.parse_args(argv)


def run(pipeline_dir: Path, data: Path, out: Path, *extra: str) -> sd3.SD3Task:
    """Train in this process (as `serial-lora train-sd3 ...` does); returns the task holding the model."""
    args = parse(["--pretrained-model-name-or-path", str(pipeline_dir), "--instance-data-dir", str(data),
                  "--instance-prompt", "a tiny cat", "--output-dir", str(out), *TINY, *extra])
    task = sd3.SD3Task(sd3.options_from_namespace(args))
    train(task, TrainingArguments.from_namespace(args))
    task.model.cpu()  # trained on a GPU where there is one; the tests compare on the CPU
    return task


def fresh_pipeline(pipeline_dir: Path) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline.from_pretrained(pipeline_dir)


# ------------------------------------------------------------------------------------------- the math


@pytest.mark.parametrize("scheme, precondition", [
    ("logit_normal", True), ("logit_normal", False), ("sigma_sqrt", True), ("mode", False), ("cosmap", True),
])
def test_loss_equals_diffusers_hand_computation(scheme, precondition):
    """For a fixed seed, the model's noisy input, timesteps, target and weighting are those of diffusers'
    SD3 DreamBooth script, computed by hand with diffusers' functions (shifted schedule, shift 3)."""
    transformer = tiny_sd3_transformer()
    task = sd3.SD3Task(sd3.SD3Options("unused", "unused",
                                      flow=sd3.FlowMatching(scheme, 0.3, 0.8, 1.29, precondition)))
    task.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    x = transformer_inputs(transformer, batch=3)
    batch = {"latents": x["hidden_states"], "prompt_embeds": x["encoder_hidden_states"],
             "pooled_prompt_embeds": x["pooled_projections"]}
    seen = {}
    hook = transformer.register_forward_pre_hook(lambda _m, _a, kw: seen.update(kw), with_kwargs=True)
    torch.manual_seed(7)
    loss = task.loss(transformer, batch)
    hook.remove()

    torch.manual_seed(7)
    x0 = batch["latents"]
    noise = torch.randn_like(x0)
    u = compute_density_for_timestep_sampling(weighting_scheme=scheme, batch_size=3, logit_mean=0.3, logit_std=0.8,
                                              mode_scale=1.29)
    schedule = task.scheduler
    timesteps = schedule.timesteps[(u * schedule.config.num_train_timesteps).long()]
    step_indices = [(schedule.timesteps == t).nonzero().item() for t in timesteps]  # the script's sigma lookup
    sigmas = schedule.sigmas[step_indices].flatten().reshape(3, 1, 1, 1)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    assert torch.equal(seen["hidden_states"], noisy)
    assert torch.equal(seen["timestep"], timesteps)
    with torch.no_grad():
        pred = transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=batch["prompt_embeds"],
                           pooled_projections=batch["pooled_prompt_embeds"], return_dict=False)[0]
    if precondition:
        pred, target = pred * (-sigmas) + noisy, x0
    else:
        target = noise - x0
    weighting = compute_loss_weighting_for_sd3(scheme, sigmas)
    expected = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(3, -1), 1).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    assert sigmas.min() > 0 and not torch.allclose(sigmas, 1 - u.reshape(3, 1, 1, 1))  # shifted, not raw u


def test_text_embeddings_are_clip_penultimate_padded_then_t5():
    """encode_captions: [CLIP-L ; CLIP-G] penultimate states zero-padded to T5's width, then T5's tokens;
    pooled = both CLIP pooled outputs. A T5 wider than the two CLIPs makes the padding visible."""
    from transformers import T5Config, T5EncoderModel

    pipe = tiny_sd3_pipeline(joint_attention_dim=80)
    torch.manual_seed(5)
    pipe.text_encoder_3 = T5EncoderModel(T5Config(vocab_size=pipe.tokenizer_3.vocab_size, d_model=80, d_ff=37,
                                                  d_kv=8, num_heads=4, num_layers=1)).eval()
    prompts = ["a red cat", "a dog", "a red cat"]
    out = sd3.encode_captions(pipe, prompts, max_sequence_length=16)
    assert list(out) == ["a red cat", "a dog"]  # each distinct caption once
    embeds, pooled = out["a dog"]
    assert embeds.shape == (77 + 16, 80) and pooled.shape == (32 + 32,)
    with torch.no_grad():
        ids = pipe.tokenizer(["a dog"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        clip = [encoder(ids, output_hidden_states=True) for encoder in (pipe.text_encoder, pipe.text_encoder_2)]
        t5_ids = pipe.tokenizer_3(["a dog"], padding="max_length", max_length=16, truncation=True,
                                  return_tensors="pt").input_ids
        t5 = pipe.text_encoder_3(t5_ids)[0][0]
    torch.testing.assert_close(embeds[:77, :32], clip[0].hidden_states[-2][0])
    torch.testing.assert_close(embeds[:77, 32:64], clip[1].hidden_states[-2][0])
    assert torch.count_nonzero(embeds[:77, 64:]) == 0
    torch.testing.assert_close(embeds[77:], t5)
    torch.testing.assert_close(pooled, torch.cat([clip[0].text_embeds[0], clip[1].text_embeds[0]]))
    sd3.free_text_encoders(pipe)
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None and pipe.text_encoder_3 is None


# --------------------------------------------------------------------------------------------- training


def test_serial_training_lowers_loss_and_files_reproduce_the_trained_transformer(pipeline_dir, tmp_path,
                                                                                  monkeypatch):
    data = write_instance_folder(tmp_path / "one", 1, {0: "a red cat"})
    out = tmp_path / "out"
    task = run(pipeline_dir, data, out, "--max-train-steps", "10", "--train-batch-size", "4", "--learning-rate",
               "5e-2", "--lora-plus-ratio", "8", "--rank", "4", "--streams", "image,text", "--export-lora",
               "--validation-prompt", "a cat", "--num-validation-images", "1", "--validation-inference-steps", "2",
               "--validation-steps", "5")
    trained = task.model.eval()
    pipe = fresh_pipeline(pipeline_dir)
    before = task.fixed_noise_loss(pipe.transformer, draws=12)
    after = task.fixed_noise_loss(trained, draws=12)
    assert after < 0.97 * before, (before, after)  # about 8% lower after 10 steps

    # The Serial LoRA file: pipe.load_serial_lora_weights reproduces the trained transformer.
    loaded = pipe.load_serial_lora_weights(out)
    assert loaded.rank == 4 and set(loaded.streams) == {"image", "text"}
    x = transformer_inputs(pipe.transformer, batch=2)
    x["encoder_hidden_states"] = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = trained(**x).sample
        torch.testing.assert_close(pipe.transformer(**x).sample, expected, rtol=0, atol=1e-6)
        pipe.unload_serial_lora_weights()
        assert not torch.allclose(pipe.transformer(**x).sample, expected, atol=1e-4)  # the adapter mattered
        # --export-lora: stock diffusers loads the standard LoRA and gives the same transformer output.
        pipe.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
        torch.testing.assert_close(pipe.transformer(**x).sample, expected, rtol=1e-4, atol=1e-5)

    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 11))
    assert [r["step"] for r in log if "val_loss" in r] == [5, 10]
    assert [r["val_loss"] for r in log if "val_loss" in r][-1] == pytest.approx(task.fixed_noise_loss(trained))
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000005-0.png", "step-000010-0.png"]
    card = (out / "README.md").read_text()
    assert str(pipeline_dir) in card and "load_serial_lora_weights" in card and "| images | 1 |" in card
    assert "| val loss on | the first 1 training images, fixed noise and timesteps |" in card  # not held-out data
    # The card's snippet, run as written from the folder holding it, rebuilds the trained transformer.
    pipe = run_card_snippet(out, monkeypatch)["pipe"]
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**x).sample, expected, rtol=0, atol=1e-6)


def test_method_lora_saves_what_stock_diffusers_loads(pipeline_dir, instance_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    task = run(pipeline_dir, instance_dir, out, "--method", "lora", "--max-train-steps", "2",
               "--train-batch-size", "1", "--gradient-accumulation-steps", "2", "--learning-rate", "1e-2",
               "--streams", "image")
    assert task.info.method == "lora" and task.info.adapter_parameters == task.info.lora_parameters
    # Image stream of 2 blocks, 32 wide, rank 4: Serial 2·r·d per block; LoRA r·(in+out) on to_q,k,v,out.0.
    assert task.info.serial_parameters == 2 * (2 * 4 * 32)
    assert task.info.lora_parameters == 4 * task.info.serial_parameters
    assert not (out / "serial_lora_weights.safetensors").exists()
    keys = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert keys and all(k.startswith("transformer.transformer_blocks.") for k in keys)
    assert not any("add_" in k for k in keys)  # --streams image: the text stream's projections are left alone
    pipe = fresh_pipeline(pipeline_dir)
    pipe.load_lora_weights(out)
    x = transformer_inputs(pipe.transformer)
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**x).sample, task.model.eval()(**x).sample, rtol=0, atol=1e-6)
    card = (out / "README.md").read_text()
    assert "| method | LoRA (PEFT) (streams: image) |" in card
    from_card = run_card_snippet(out, monkeypatch)["pipe"]  # the card's snippet runs as written from its folder
    with torch.no_grad():
        torch.testing.assert_close(from_card.transformer(**x).sample, pipe.transformer(**x).sample, rtol=0, atol=0)


# Two processes in one group: gloo on CPU (CI) and NCCL on 2 GPUs (`-m multigpu`), through `accelerate launch`.
# The CPU variant hides any GPU (on a one-GPU machine both ranks would share it, which NCCL refuses).
LAUNCHES = {"cpu_gloo": (["--mixed_precision", "no"], {"CUDA_VISIBLE_DEVICES": ""}),
            "two_gpus": pytest.param((["--mixed_precision", "bf16"], {}), marks=pytest.mark.multigpu)}


@pytest.mark.parametrize("launch", LAUNCHES.values(), ids=list(LAUNCHES))
def test_two_process_ddp_writes_one_file_the_pipeline_loads(launch, pipeline_dir, instance_dir, tmp_path):
    launch, env = launch
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
               "--num_machines", "1", "--dynamo_backend", "no", *launch, "-m", "serial_lora_train.sd3",
               "--pretrained-model-name-or-path", str(pipeline_dir), "--instance-data-dir", str(instance_dir),
               "--instance-prompt", "a tiny cat", "--output-dir", str(out), *TINY, "--max-train-steps", "2",
               "--train-batch-size", "1", "--rank", "4", "--learning-rate", "1e-2", "--streams", "image,text"]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1", **env),
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^processes\s+2$", done.stdout, re.M), done.stdout  # both trained, in one group
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]  # written once, by the main process
    pipe = fresh_pipeline(pipeline_dir)
    loaded = pipe.load_serial_lora_weights(out)
    assert loaded.rank == 4 and set(loaded.streams) == {"image", "text"}
    from diffusers_loader.fetch import DEFAULT_WEIGHT_NAME
    from serial_lora_core import read_file

    assert any(pair.up.abs().sum() > 0 for pair in read_file(out / DEFAULT_WEIGHT_NAME).weights.values())  # trained


def test_resumed_run_with_gradient_checkpointing_equals_uninterrupted_run(pipeline_dir, instance_dir, tmp_path):
    """2 steps + resume to 4 (with --gradient-checkpointing, which recomputes activations and must not change
    the result) == 4 steps straight (without): bit-identical adapters on CPU, dropout and per-step latent
    sampling included."""
    common = ("--train-batch-size", "1", "--learning-rate", "1e-2", "--checkpointing-steps", "2", "--dropout", "0.1")
    run(pipeline_dir, instance_dir, tmp_path / "straight", "--max-train-steps", "4", *common)
    first = run(pipeline_dir, instance_dir, tmp_path / "resumed", "--max-train-steps", "2", "--gradient-checkpointing",
                *common)
    assert first.model.is_gradient_checkpointing
    run(pipeline_dir, instance_dir, tmp_path / "resumed", "--max-train-steps", "4", "--resume-from-checkpoint",
        "latest", "--gradient-checkpointing", *common)
    a = load_file(str(tmp_path / "straight" / "serial_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "serial_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith(".up.weight") and a[k].abs().sum() > 0 for k in a)  # it trained (B left zero)


COMFYUI = Path(os.environ.get("SERIAL_LORA_COMFYUI", REPO / "third_party" / "ComfyUI"))
# Runs in a subprocess (ComfyUI puts generic module names on sys.path): ComfyUI loads the base transformer's
# diffusers-format file, the pack's "Load Serial LoRA (model only)" node patches it with the trained file at
# strength 1, and the patched fused q/k/v weights are written out.
COMFY_LOAD = """
import sys
comfy_dir, repo, model_file, lora_dir, out_file = sys.argv[1:6]
sys.path[:0] = [comfy_dir, repo]
from comfy.cli_args import args
args.cpu = True
import comfy.sd, folder_paths, torch
from safetensors.torch import load_file, save_file
from comfyui_nodes import nodes as pack
folder_paths.add_model_folder_path("serial_loras", lora_dir, is_default=True)
model = comfy.sd.load_diffusion_model_state_dict(load_file(model_file))
patched = pack.SerialLoraLoaderModelOnly.execute(model=model, lora_name="trained.safetensors", strength_model=1.0).args[0]
patched.patch_model(device_to=torch.device("cpu"))
save_file({k: v.float().contiguous() for k, v in patched.model.state_dict().items() if k.endswith(".qkv.weight")},
          out_file)
"""


def test_comfyui_node_loads_the_trained_file(tmp_path):
    """Trained on a tiny SD3.5 (attn2 in block 0) that ComfyUI can load (hidden size 64 x depth), the file
    patches ComfyUI's fused qkv weights to exactly the trained transformer's merged q, k, v (image and
    text streams, and attn2's image stream)."""
    from sd3_tiny import COMFY_COMPATIBLE_CONFIG

    from serial_lora_core import merge_serial_lora

    assert (COMFYUI / "comfy" / "model_patcher.py").is_file(), f"ComfyUI not found at {COMFYUI}: run scripts/setup.sh"
    pipeline = tmp_path / "comfy_sd3"
    shared = ("sample_size", "patch_size", "joint_attention_dim", "pooled_projection_dim")  # the tiny text encoders'
    config = {k: v for k, v in COMFY_COMPATIBLE_CONFIG.items() if k not in shared}
    tiny_sd3_pipeline(dual_attention=True, **config).save_pretrained(pipeline)  # SD3.5's attn2 in block 0
    out = tmp_path / "out"
    task = run(pipeline, write_instance_folder(tmp_path / "one", 1), out, "--max-train-steps", "2",
               "--train-batch-size", "1", "--learning-rate", "1e-2")
    loras = tmp_path / "serial_loras"
    loras.mkdir()
    (loras / "trained.safetensors").write_bytes((out / "serial_lora_weights.safetensors").read_bytes())
    done = subprocess.run([sys.executable, "-c", COMFY_LOAD, str(COMFYUI), str(REPO),
                           str(pipeline / "transformer" / "diffusion_pytorch_model.safetensors"), str(loras),
                           str(tmp_path / "comfy.safetensors")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    comfy = load_file(str(tmp_path / "comfy.safetensors"))
    model = task.model
    merge_serial_lora(model)
    streams = {"x_block.attn": ("attn", "to_q", "to_k", "to_v"),
               "context_block.attn": ("attn", "add_q_proj", "add_k_proj", "add_v_proj"),
               "x_block.attn2": ("attn2", "to_q", "to_k", "to_v")}
    checked = 0
    for n, block in enumerate(model.transformer_blocks):
        for name, (attention, *projections) in streams.items():
            if getattr(block, attention, None) is None:
                continue
            merged = torch.cat([getattr(getattr(block, attention), p).weight.detach() for p in projections])
            key = f"diffusion_model.joint_blocks.{n}.{name}.qkv.weight"
            torch.testing.assert_close(comfy[key], merged, rtol=0, atol=1e-6)
            checked += 1
    assert checked == 5 == len(comfy)  # 2 blocks x (image, text) + block 0's attn2
    original = load_file(str(pipeline / "transformer" / "diffusion_pytorch_model.safetensors"))
    trained_q = comfy["diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"][:128]
    assert (trained_q - original["transformer_blocks.0.attn.to_q.weight"]).abs().max() > 1e-4  # the adapter trained


# ------------------------------------------------------------------------------------------- bad input


def _corrupt(folder: Path) -> None:
    write_instance_folder(folder, 2)
    (folder / "img1.png").write_bytes((folder / "img1.png").read_bytes()[:60])  # truncated PNG


BAD_INPUTS = {
    # case: (make the instance folder, extra arguments, expected message part)
    "missing folder": (lambda f: None, [], "is not a folder"),
    "empty folder": (lambda f: f.mkdir(), [], "holds no image"),
    "caption without image": (lambda f: (write_instance_folder(f, 1), (f / "lost.txt").write_text("x")), [],
                              "caption file(s) without an image: lost.txt"),
    "no caption, no prompt": (lambda f: write_instance_folder(f, 2, {0: "a cat"}), ["--instance-prompt", ""],
                              "1 image(s) have no caption file (img1.png)"),
    "corrupt image": (_corrupt, [], "1 unreadable image(s): img1.png"),
    "rank larger than width": (lambda f: write_instance_folder(f, 1), ["--rank", "64"],
                               "rank 64 is larger than the width 32"),
    "resolution": (lambda f: write_instance_folder(f, 1), ["--resolution", "33"], "--resolution 33 is not a multiple of 2"),
    "streams": (lambda f: write_instance_folder(f, 1), ["--streams", "image,audio"], "pass 'image' or 'image,text'"),
    "T5 length": (lambda f: write_instance_folder(f, 1), ["--max-sequence-length", "600"], "T5 takes at most 512"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_before_training_and_writes_nothing(case, pipeline_dir, tmp_path, capsys):
    make, extra, message = BAD_INPUTS[case]
    data, out = tmp_path / "data", tmp_path / "out"
    make(data)
    args = parse(["--pretrained-model-name-or-path", str(pipeline_dir), "--instance-data-dir", str(data),
                  "--instance-prompt", "a cat", "--output-dir", str(out), *TINY, "--max-train-steps", "1", *extra])
    assert sd3.main(args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists()


def test_not_a_pipeline_and_another_runs_folder_are_refused(pipeline_dir, instance_dir, tmp_path, capsys):
    """Through the `serial-lora train-sd3` command itself (the core CLI's sub-command)."""
    from serial_lora_core.cli import main as serial_lora

    not_a_pipeline = tmp_path / "empty_model"
    not_a_pipeline.mkdir()
    assert serial_lora(["train-sd3", "--pretrained-model-name-or-path", str(not_a_pipeline), "--instance-data-dir",
                        str(instance_dir), "--output-dir", str(tmp_path / "out"), *TINY, "--instance-prompt", "a cat"]) == 2
    assert f"--pretrained-model-name-or-path {str(not_a_pipeline)!r}: cannot load an SD3 pipeline" in capsys.readouterr().err

    out = tmp_path / "other_run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"task": "train-classifier"}))
    args = parse(["--pretrained-model-name-or-path", str(pipeline_dir), "--instance-data-dir", str(instance_dir),
                  "--output-dir", str(out), *TINY, "--instance-prompt", "a cat"])
    assert sd3.main(args) == 2
    assert "holds a different run" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]


def test_skip_bad_images_trains_on_the_rest_and_counts_them(pipeline_dir, tmp_path, capsys):
    data = tmp_path / "data"
    _corrupt(data)
    task = run(pipeline_dir, data, tmp_path / "out", "--skip-bad-images", "--max-train-steps", "1",
               "--train-batch-size", "1")
    assert task.data_facts["images"] == 1 and len(task.data_facts["skipped"]) == 1
    assert "skipped images        1" in capsys.readouterr().out
    assert "1 unreadable image(s) skipped" in (tmp_path / "out" / "README.md").read_text()


def test_benchmark_smoke_runs_on_cpu(tmp_path):
    """benchmarks/train_sd3.py --smoke: the trainer's step next to the bare step, in seconds on CPU."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_sd3.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "train_sd3.json").read_text())["train"]["serial"]
    assert result["trainer"]["iters"] == 3 and result["trainer"]["median_ms"] > 0
    assert result["bare_before"]["median_ms"] > 0 and result["bare_after"]["median_ms"] > 0
    assert result["trainer"]["adapter_parameters"] == 2 * (2 * 4 * 16)  # 2 blocks x 2·r·d, image stream 16 wide
    assert result["trainer_over_bare_steps_per_s"] > 0
