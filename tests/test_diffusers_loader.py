"""diffusers loader: `pipe.load_serial_lora_weights` and friends on a tiny SD3 pipeline built in code."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, save_file
from sd3_tiny import generate, tiny_sd3_pipeline, tiny_sd3_transformer, transformer_inputs

import diffusers_loader
from diffusers_loader import export_to_lora
from serial_lora_core import (
    SerialLoraConfig,
    SerialLoraFileError,
    loraplus_param_groups,
    read_file,
    serial_lora_modules,
    serial_lora_parameters,
)
from serial_lora_core.cli import main as cli_main

WEIGHT = "serial_lora_weights.safetensors"


def randomise(transformer, seed: int, std: float = 0.3) -> None:
    """Give every adapter of `transformer` non-zero up weights (B), so it changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in serial_lora_parameters(transformer):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def make_adapter(folder: Path, seed: int = 0, streams=None, rank: int = 4, **transformer_overrides) -> Path:
    """Save a random Serial LoRA for the tiny transformer (same base weights as tiny_sd3_pipeline())."""
    transformer = tiny_sd3_transformer(**transformer_overrides)
    diffusers_loader.add_serial_lora(transformer, SerialLoraConfig(rank=rank, alpha=2.0 * rank, streams=streams))
    randomise(transformer, seed)
    return transformer.save_serial_lora_adapter(folder)


def snapshot(pipe) -> dict:
    """Everything a failed load must leave as it was."""
    t = pipe.transformer
    return {
        "state": {k: v.clone() for k, v in t.state_dict().items()},
        "modules": [(n, type(m).__name__) for n, m in t.named_modules()],
        "hooks": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in t.modules()),
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["modules"] == after["modules"]
    assert before["hooks"] == after["hooks"]
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key


@pytest.fixture(scope="module")
def base_pipe():
    return tiny_sd3_pipeline()


@pytest.fixture(scope="module")
def base_images(base_pipe):
    return generate(base_pipe)


@pytest.fixture
def pipe(base_pipe):
    return copy.deepcopy(base_pipe)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapter")
    make_adapter(folder, streams=("image", "text"))
    return folder


def test_import_installs_methods_on_every_sd3_pipeline():
    from diffusers import (
        SD3Transformer2DModel,
        StableDiffusion3ControlNetPipeline,
        StableDiffusion3Img2ImgPipeline,
        StableDiffusion3InpaintPipeline,
        StableDiffusion3Pipeline,
    )

    for cls in (StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline,
                StableDiffusion3ControlNetPipeline):
        for name in ("load_serial_lora_weights", "set_serial_lora_scale", "fuse_serial_lora", "unfuse_serial_lora",
                     "unload_serial_lora_weights", "set_serial_lora_adapters", "save_serial_lora_weights"):
            assert callable(getattr(cls, name)), (cls, name)
    assert callable(SD3Transformer2DModel.load_serial_lora_adapter)
    diffusers_loader.install()  # idempotent
    assert StableDiffusion3Pipeline.load_serial_lora_weights is diffusers_loader.SerialLoraLoaderMixin.load_serial_lora_weights


def test_scale_zero_is_base_scale_one_is_fused(pipe, base_images, adapter_dir):
    pipe.load_serial_lora_weights(adapter_dir)
    adapted = generate(pipe)
    assert (adapted - base_images).abs().max() > 1e-3
    pipe.set_serial_lora_scale(0.0)
    assert torch.equal(generate(pipe), base_images)
    pipe.set_serial_lora_scale(1.0)
    pipe.fuse_serial_lora()
    torch.testing.assert_close(generate(pipe), adapted, atol=1e-4, rtol=0)
    pipe.unfuse_serial_lora()
    assert torch.equal(generate(pipe), adapted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unfuse_restores_weights_bit_for_bit(dtype, adapter_dir):
    transformer = tiny_sd3_transformer().to(dtype)
    original = {k: v.clone() for k, v in transformer.state_dict().items()}
    transformer.load_serial_lora_adapter(adapter_dir)
    adapter = next(iter(serial_lora_modules(transformer)))[1]["default"]["image"]
    assert adapter.down.weight.dtype == dtype  # moved to the transformer's dtype
    diffusers_loader.transformer.fuse(transformer)
    q = transformer.transformer_blocks[0].attn.to_q.weight
    assert not torch.equal(q, original["transformer_blocks.0.attn.to_q.weight"])
    diffusers_loader.transformer.unfuse(transformer)
    for key, value in original.items():
        assert torch.equal(transformer.state_dict()[key], value), key


def test_unload_restores_modules_and_weights(pipe, base_images, adapter_dir):
    before = snapshot(pipe)
    pipe.load_serial_lora_weights(adapter_dir)
    pipe.fuse_serial_lora()
    pipe.unload_serial_lora_weights()
    assert_same(before, snapshot(pipe))
    assert torch.equal(generate(pipe), base_images)


def test_sd3_hosts_cover_last_block_and_sd35_attn2(tmp_path):
    transformer = tiny_sd3_transformer(dual_attention_layers=(0,))
    diffusers_loader.add_serial_lora(transformer, SerialLoraConfig(rank=2, streams=("image", "text")))
    adapted = {(name, stream) for name, module in serial_lora_modules(transformer) for stream in module["default"]}
    assert adapted == {
        ("transformer_blocks.0.attn", "image"), ("transformer_blocks.0.attn", "text"),
        ("transformer_blocks.0.attn2", "image"),  # SD3.5 dual attention: image tokens only
        ("transformer_blocks.1.attn", "image"), ("transformer_blocks.1.attn", "text"),  # context_pre_only block
    }
    assert transformer.transformer_blocks[1].attn.context_pre_only
    randomise(transformer, 1)
    inputs = transformer_inputs(transformer)
    with torch.no_grad():
        unmerged = transformer(**inputs).sample
        diffusers_loader.transformer.fuse(transformer)
        merged = transformer(**inputs).sample
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    diffusers_loader.transformer.unfuse(transformer)
    path = transformer.save_serial_lora_adapter(tmp_path)
    assert "transformer_blocks.0.attn2.serial_lora.image.down.weight" in load_file(path)


def test_text_stream_sees_only_the_text_projections():
    """The text adapter must change add_q/k/v_proj's input only: to_add_out and the image path see none of it."""
    transformer = tiny_sd3_transformer()
    diffusers_loader.add_serial_lora(transformer, SerialLoraConfig(rank=2, streams=("text",)))
    randomise(transformer, 2)
    attn = transformer.transformer_blocks[0].attn
    seen = {}
    for name in ("to_q", "add_q_proj", "add_k_proj", "to_add_out"):
        getattr(attn, name).register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, a[0].clone()))
    captured = {}
    attn.register_forward_pre_hook(lambda m, a, k: captured.update(k), with_kwargs=True)
    with torch.no_grad():
        transformer(**transformer_inputs(transformer))
    adapter = attn.serial_lora["default"]["text"]
    text = captured["encoder_hidden_states"]
    expected = text + adapter.scale * (text @ adapter.down.weight.T) @ adapter.up.weight.T
    torch.testing.assert_close(seen["add_q_proj"], expected, atol=1e-5, rtol=0)
    assert torch.equal(seen["add_q_proj"], seen["add_k_proj"])
    assert torch.equal(seen["to_q"], captured["hidden_states"])


@pytest.mark.parametrize("rank", [4, 8])
def test_image_stream_has_a_quarter_of_peft_lora_parameters(rank):
    serial = tiny_sd3_transformer()
    diffusers_loader.add_serial_lora(serial, SerialLoraConfig(rank=rank, streams=("image",)))
    serial_count = sum(p.numel() for p in serial_lora_parameters(serial))
    lora = tiny_sd3_transformer()
    inject_adapter_in_model(LoraConfig(r=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), lora)
    lora_count = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    width = 32
    assert serial_count == len(lora.transformer_blocks) * 2 * width * rank
    assert 4 * serial_count == lora_count


def test_two_named_adapters_with_weights_match_the_formula(pipe, tmp_path):
    a = make_adapter(tmp_path / "a", seed=1, streams=("image",))
    b = make_adapter(tmp_path / "b", seed=2, streams=("image",))
    pipe.load_serial_lora_weights(a.parent, adapter_name="style")
    pipe.load_serial_lora_weights(b.parent, adapter_name="subject")
    assert pipe.get_serial_lora_adapters() == ["style", "subject"]
    pipe.set_serial_lora_adapters(["style", "subject"], [1.0, 0.5])
    unfused = generate(pipe)
    attn = pipe.transformer.transformer_blocks[0].attn
    base_q = attn.to_q.weight.detach().clone()
    pipe.fuse_serial_lora()
    expected = base_q.clone()
    for path, weight in ((a, 1.0), (b, 0.5)):
        f = read_file(path)
        pair = f.weights[("transformer_blocks.0.attn", "image")]
        expected += weight * f.scale * (base_q @ pair.up) @ pair.down
    torch.testing.assert_close(attn.to_q.weight, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(generate(pipe), unfused, atol=1e-4, rtol=0)
    pipe.unfuse_serial_lora()
    pipe.set_serial_lora_adapters("style")  # the other adapter is switched off
    only_style = generate(pipe)
    pipe.unload_serial_lora_weights("subject")
    pipe.set_serial_lora_scale(1.0)
    assert torch.equal(generate(pipe), only_style)


def test_export_to_standard_lora_loads_in_stock_diffusers(pipe, base_pipe, adapter_dir, tmp_path):
    pipe.load_serial_lora_weights(adapter_dir)
    serial_images = generate(pipe)
    exported = export_to_lora(pipe, tmp_path / "lora.safetensors")
    tensors = load_file(exported)
    assert all(".lora_A." in k or ".lora_B." in k for k in tensors)
    lora_pipe = copy.deepcopy(base_pipe)
    lora_pipe.load_lora_weights(str(exported))  # unmodified diffusers + peft
    torch.testing.assert_close(generate(lora_pipe), serial_images, atol=1e-4, rtol=0)
    serial_params = read_file(adapter_dir / WEIGHT).num_parameters
    assert sum(t.numel() for t in tensors.values()) > 2 * serial_params


def test_export_lora_cli_from_a_saved_transformer_folder(base_pipe, adapter_dir, tmp_path, capsys):
    base_pipe.transformer.save_pretrained(tmp_path / "pipeline" / "transformer")
    out = tmp_path / "lora.safetensors"
    code = cli_main(["export-lora", str(adapter_dir / WEIGHT), str(out), "--base", str(tmp_path / "pipeline")])
    assert code == 0 and "projections" in capsys.readouterr().out
    serial_pipe = copy.deepcopy(base_pipe)
    serial_pipe.load_serial_lora_weights(adapter_dir)
    lora_pipe = copy.deepcopy(base_pipe)
    lora_pipe.load_lora_weights(str(out))
    torch.testing.assert_close(generate(lora_pipe), generate(serial_pipe), atol=1e-4, rtol=0)


def test_load_from_a_prefilled_hub_cache(pipe, adapter_dir, tmp_path, base_images):
    """The hub path goes through huggingface_hub's own download/cache code, offline."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--sd3-serial-lora"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    shutil.copy(adapter_dir / WEIGHT, repo / "snapshots" / commit / WEIGHT)
    pipe.load_serial_lora_weights("someone/sd3-serial-lora", cache_dir=str(cache), local_files_only=True)
    assert not torch.equal(generate(pipe), base_images)
    with pytest.raises(LocalEntryNotFoundError):
        pipe.load_serial_lora_weights("someone/other", cache_dir=str(cache), local_files_only=True, adapter_name="x")


def test_cpu_offload_path(pipe, adapter_dir):
    pipe.load_serial_lora_weights(adapter_dir)
    expected = generate(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    assert torch.equal(generate(pipe), expected)
    pipe.fuse_serial_lora()
    torch.testing.assert_close(generate(pipe), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_transformer_runs_the_adapter(dtype, adapter_dir):
    transformer = tiny_sd3_transformer()
    inputs = transformer_inputs(transformer)
    reference = copy.deepcopy(transformer)
    reference.load_serial_lora_adapter(adapter_dir)
    transformer = transformer.to(dtype)
    transformer.load_serial_lora_adapter(adapter_dir)
    with torch.no_grad():
        expected = reference(**inputs).sample
        got = transformer(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}).sample
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=0.15, rtol=0.05)


def _bad_inputs(tmp_path: Path, adapter_dir: Path) -> dict[str, tuple[Path, str]]:
    bad = {}
    bad["deeper model"] = (make_adapter(tmp_path / "deep", num_layers=3), "3 attention modules|attention module")
    bad["wider model"] = (make_adapter(tmp_path / "wide", attention_head_dim=16), r"shape \(4, 64\)")
    standard = tmp_path / "standard.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}, str(standard))
    bad["standard LoRA"] = (standard, "standard LoRA")
    raw = (adapter_dir / WEIGHT).read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    bad["truncated"] = (truncated, "truncated|not a readable safetensors")
    pickle = tmp_path / "pickle.safetensors"
    torch.save({"a": torch.zeros(1)}, pickle)
    bad["pickle"] = (pickle, "pickle")
    flipped = bytearray(raw)
    flipped[-3] ^= 0xFF
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(bytes(flipped))
    bad["corrupt"] = (corrupt, "sha256")
    return bad


CASES = ["deeper model", "wider model", "standard LoRA", "truncated", "pickle", "corrupt"]


@pytest.mark.parametrize("case", CASES)
def test_bad_files_raise_and_leave_the_pipeline_unchanged(case, pipe, adapter_dir, tmp_path):
    path, pattern = _bad_inputs(tmp_path, adapter_dir)[case]
    pipe.load_serial_lora_weights(adapter_dir, adapter_name="existing")  # unchanged includes loaded adapters
    before = snapshot(pipe)
    with pytest.raises(SerialLoraFileError, match=pattern):
        pipe.load_serial_lora_weights(path, adapter_name="new")
    assert_same(before, snapshot(pipe))


def test_file_for_another_model_names_both_architectures(pipe, tmp_path):
    path = make_adapter(tmp_path, attention_head_dim=16)
    with pytest.raises(SerialLoraFileError) as err:
        pipe.load_serial_lora_weights(path)
    assert "width=64" in str(err.value) and "width=32" in str(err.value)


def test_serial_lora_refused_by_stock_load_lora_weights(pipe, adapter_dir):
    before = snapshot(pipe)
    with pytest.raises(SerialLoraFileError, match="load_serial_lora_weights"):
        pipe.load_lora_weights(str(adapter_dir / WEIGHT))
    assert_same(before, snapshot(pipe))


def test_trained_adapter_reproduces_the_trained_transformer(tmp_path, base_pipe):
    """A few LoRA+ steps in diffusers, save, then a fresh pipeline reproduces the trained outputs exactly."""
    pipe = copy.deepcopy(base_pipe)
    transformer = pipe.transformer
    diffusers_loader.add_serial_lora(transformer, SerialLoraConfig(rank=4, dropout=0.1, streams=("image", "text")))
    transformer.train()
    optimizer = torch.optim.AdamW(loraplus_param_groups(transformer, lr=1e-3, ratio=20))
    inputs = transformer_inputs(transformer, batch=2)
    target = torch.randn_like(inputs["hidden_states"])
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(transformer(**inputs).sample, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    transformer.eval()
    pipe.save_serial_lora_weights(tmp_path)
    meta = read_file(tmp_path / WEIGHT).metadata
    assert json.loads(meta["streams"]) == {"image": ["to_q", "to_k", "to_v"], "text": ["add_q_proj", "add_k_proj", "add_v_proj"]}
    assert meta["architecture"] == diffusers_loader.architecture_name(transformer)
    fresh = copy.deepcopy(base_pipe)
    fresh.load_serial_lora_weights(tmp_path)
    with torch.no_grad():
        expected = transformer(**inputs).sample
        got = fresh.transformer(**inputs).sample
    assert torch.equal(got, expected)
    assert torch.equal(generate(fresh), generate(pipe))
