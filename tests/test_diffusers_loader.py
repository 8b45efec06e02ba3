"""diffusers loader: `pipe.load_serial_lora_weights` and friends on a tiny SD3 pipeline built in code."""

from __future__ import annotations

import copy
import inspect
import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from accelerate import cpu_offload
from diffusers import (
    SD3Transformer2DModel,
    StableDiffusion3ControlNetInpaintingPipeline,
    StableDiffusion3ControlNetPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3PAGImg2ImgPipeline,
    StableDiffusion3PAGPipeline,
    StableDiffusion3Pipeline,
)
from huggingface_hub.errors import LocalEntryNotFoundError
from peft import LoraConfig, inject_adapter_in_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sd3_tiny import PROMPT, generate, tiny_sd3_pipeline, tiny_sd3_transformer, transformer_inputs

import diffusers_loader
from diffusers_loader import export_to_lora
from serial_lora_core import (
    SerialLoraConfig,
    SerialLoraError,
    SerialLoraFileError,
    loraplus_param_groups,
    read_file,
    serial_lora_modules,
    serial_lora_parameters,
)
from serial_lora_core.cli import main as cli_main

WEIGHT = diffusers_loader.DEFAULT_WEIGHT_NAME
SD3_PIPELINES = [StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline,
                 StableDiffusion3ControlNetPipeline, StableDiffusion3ControlNetInpaintingPipeline,
                 StableDiffusion3PAGPipeline, StableDiffusion3PAGImg2ImgPipeline]
PIPELINE_METHODS = ["load_serial_lora_weights", "save_serial_lora_weights", "set_serial_lora_scale",
                    "set_serial_lora_adapters", "get_serial_lora_adapters", "fuse_serial_lora", "unfuse_serial_lora",
                    "unload_serial_lora_weights", "enable_serial_lora", "disable_serial_lora"]
FUSED_TOLERANCE = 1e-4  # fused (float32 merge) vs unfused images of the float32 pipeline


def randomise(transformer, seed: int, std: float = 0.3) -> None:
    """Give every adapter of `transformer` non-zero weights, so it changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in serial_lora_parameters(transformer):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def make_adapter(folder: Path, seed: int = 0, streams=("image", "text"), rank: int = 4, dtype=None,
                 **transformer_overrides) -> Path:
    """Save a random Serial LoRA for the tiny transformer (same base weights as tiny_sd3_pipeline())."""
    transformer = tiny_sd3_transformer(**transformer_overrides)
    diffusers_loader.add_serial_lora(transformer, SerialLoraConfig(rank=rank, alpha=2.0 * rank, streams=streams))
    randomise(transformer, seed)
    return transformer.save_serial_lora_adapter(folder, dtype=dtype)


def snapshot(pipe) -> dict:
    """Everything a refused call must leave as it was."""
    t = pipe.transformer
    return {
        "state": {k: v.clone() for k, v in t.state_dict().items()},
        "modules": [(n, type(m).__name__) for n, m in t.named_modules()],
        "hooks": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in t.modules()),
        "adapters": pipe.get_serial_lora_adapters(),
        "attributes": sorted(vars(t)),
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["modules"] == after["modules"]
    assert before["hooks"] == after["hooks"]
    assert before["adapters"] == after["adapters"]
    assert before["attributes"] == after["attributes"]
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        if value.is_meta:  # no data to compare
            assert after["state"][key].is_meta and after["state"][key].shape == value.shape, key
        else:
            assert torch.equal(value, after["state"][key]), key


def fused_by_hand(transformer, files_and_weights) -> dict[str, torch.Tensor]:
    """W + sum_i w_i·s_i·(W B_i) A_i for every projection the files adapt, from the files themselves."""
    expected = {}
    for path, weight in files_and_weights:
        adapter = read_file(path)
        for (attention, stream), pair in adapter.weights.items():
            for projection in adapter.streams[stream]:
                name = f"{attention}.{projection}.weight"
                parameter = transformer.get_parameter(name).detach()
                base = parameter.float()
                # The adapter holds the file's weights in the projection's dtype.
                up, down = (t.to(parameter.dtype).float() for t in (pair.up, pair.down))
                expected.setdefault(name, base.clone())
                expected[name] += weight * adapter.scaling * (base @ up) @ down
    return expected


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
    make_adapter(folder)
    return folder


# ------------------------------------------------------------------------------------------ install
@pytest.mark.parametrize("pipeline_class", SD3_PIPELINES, ids=lambda c: c.__name__)
def test_import_installs_the_methods_on_every_sd3_pipeline(pipeline_class):
    for name in PIPELINE_METHODS:
        assert getattr(pipeline_class, name) is getattr(diffusers_loader.SerialLoraLoaderMixin, name)


def test_install_is_idempotent_and_gives_the_transformer_its_methods():
    guarded = StableDiffusion3Pipeline.lora_state_dict
    diffusers_loader.install()
    assert StableDiffusion3Pipeline.lora_state_dict == guarded  # not wrapped twice
    for name in ("load_serial_lora_adapter", "save_serial_lora_adapter"):
        assert getattr(SD3Transformer2DModel, name) is getattr(diffusers_loader.SerialLoraTransformerMixin, name)


# ------------------------------------------------------------------------------------------ strength, fuse, unload
def test_scale_zero_is_base_scale_one_is_fused(pipe, base_images, adapter_dir):
    pipe.load_serial_lora_weights(adapter_dir)
    adapted = generate(pipe)
    assert (adapted - base_images).abs().max() > 1e-3
    pipe.set_serial_lora_scale(0.0)
    assert torch.equal(generate(pipe), base_images)
    pipe.set_serial_lora_scale(1.0)
    pipe.disable_serial_lora()
    assert torch.equal(generate(pipe), base_images)
    pipe.enable_serial_lora()
    pipe.fuse_serial_lora()
    torch.testing.assert_close(generate(pipe), adapted, atol=FUSED_TOLERANCE, rtol=0)
    with pytest.raises(SerialLoraError, match="unfuse"):
        pipe.set_serial_lora_adapters("default", 0.5)  # fused weights cannot follow a new strength
    pipe.unfuse_serial_lora()
    assert torch.equal(generate(pipe), adapted)


def test_fuse_with_a_scale_equals_that_strength_unfused(pipe, adapter_dir):
    pipe.load_serial_lora_weights(adapter_dir)
    pipe.set_serial_lora_scale(0.4)
    expected = generate(pipe)
    pipe.set_serial_lora_scale(1.0)
    pipe.fuse_serial_lora(scale=0.4)
    torch.testing.assert_close(generate(pipe), expected, atol=FUSED_TOLERANCE, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unfuse_restores_weights_bit_for_bit(dtype, pipe, adapter_dir):
    pipe.transformer.to(dtype)
    original = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_serial_lora_weights(adapter_dir)
    adapter = pipe.transformer.transformer_blocks[0].attn.serial_lora["default"]["image"]
    assert adapter.down.weight.dtype == dtype  # created in the projections' dtype
    expected = fused_by_hand(pipe.transformer, [(adapter_dir / WEIGHT, 1.0)])
    pipe.fuse_serial_lora()
    for name, value in expected.items():
        got = pipe.transformer.get_parameter(name)
        assert got.dtype == dtype and not torch.equal(got, original[name]), name
        # merged in float32 and rounded once: within one rounding step of the formula
        torch.testing.assert_close(got.float(), value, atol=1e-6, rtol=torch.finfo(dtype).eps, msg=name)
    pipe.unfuse_serial_lora()
    for key, value in original.items():
        assert torch.equal(pipe.transformer.state_dict()[key], value), key


def test_unload_restores_modules_and_state_dict(pipe, base_images, adapter_dir, tmp_path):
    before = snapshot(pipe)
    pipe.load_serial_lora_weights(adapter_dir, adapter_name="one")
    pipe.load_serial_lora_weights(make_adapter(tmp_path, seed=5, streams=("image",)), adapter_name="two")
    assert any(".serial_lora." in k for k in pipe.transformer.state_dict())
    pipe.fuse_serial_lora()
    pipe.unload_serial_lora_weights()
    assert_same(before, snapshot(pipe))
    assert torch.equal(generate(pipe), base_images)


def test_two_named_adapters_with_weights_match_the_formula(pipe, tmp_path):
    a = make_adapter(tmp_path / "a", seed=1, streams=("image", "text"))
    b = make_adapter(tmp_path / "b", seed=2, streams=("image",), rank=2)
    pipe.load_serial_lora_weights(a.parent, adapter_name="style")
    pipe.load_serial_lora_weights(b, adapter_name="subject")
    assert pipe.get_serial_lora_adapters() == ["style", "subject"]
    pipe.set_serial_lora_adapters(["style", "subject"], [1.0, 0.5])
    unfused = generate(pipe)
    expected = fused_by_hand(pipe.transformer, [(a, 1.0), (b, 0.5)])
    pipe.fuse_serial_lora()
    for name, value in expected.items():
        torch.testing.assert_close(pipe.transformer.get_parameter(name), value, atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(generate(pipe), unfused, atol=FUSED_TOLERANCE, rtol=0)
    pipe.unfuse_serial_lora()
    pipe.set_serial_lora_adapters("style")  # the other adapter is switched off
    only_style = generate(pipe)
    pipe.unload_serial_lora_weights("subject")
    pipe.set_serial_lora_scale(1.0)
    assert torch.equal(generate(pipe), only_style)


def test_adapter_names_default_hotswap_and_reuse(pipe, adapter_dir, tmp_path):
    other = make_adapter(tmp_path / "other", seed=7)
    pipe.load_serial_lora_weights(adapter_dir)
    pipe.load_serial_lora_weights(other)
    assert pipe.get_serial_lora_adapters() == ["default", "default_1"]
    pipe.set_serial_lora_adapters("default_1")
    expected = generate(pipe)
    before = snapshot(pipe)
    with pytest.raises(SerialLoraError, match="already loaded"):
        pipe.load_serial_lora_weights(other, adapter_name="default")
    assert_same(before, snapshot(pipe))
    pipe.load_serial_lora_weights(other, adapter_name="default", hotswap=True)  # keeps its strength (0)
    pipe.set_serial_lora_adapters("default")
    assert torch.equal(generate(pipe), expected)


def test_generated_adapter_names_never_collide(adapter_dir, tmp_path):
    """Three loads (default, default_1, default_2), unload default_1, a fourth load: a new name, and
    default_2 keeps its own weights (it used to be silently replaced)."""
    transformer = tiny_sd3_transformer()
    files = [make_adapter(tmp_path / str(seed), seed=seed) for seed in (11, 12, 13, 14)]
    for path in files[:3]:
        transformer.load_serial_lora_adapter(path)
    names = lambda: diffusers_loader.transformer.adapter_names(transformer)  # noqa: E731
    assert names() == ["default", "default_1", "default_2"]
    diffusers_loader.transformer.unload(transformer, "default_1")
    kept = {k: v.clone() for k, v in transformer.state_dict().items() if ".default_2." in k}
    assert kept
    transformer.load_serial_lora_adapter(files[3])
    assert names() == ["default", "default_2", "default_3"]
    for key, value in kept.items():
        assert torch.equal(transformer.state_dict()[key], value), key


@pytest.mark.parametrize("weights, error, pattern", [
    ([0.25, float("nan")], ValueError, r"'default_1' is nan"),
    ([0.25, float("inf")], ValueError, r"'default_1' is inf"),
    ([0.25, 1e300], ValueError, r"'default_1' is 1e\+300"),
    ([0.25, 3e38], ValueError, r"3e\+38 times the adapter's scaling 2"),  # finite alone, not times alpha/r = 2
    ([0.25, "0.5"], TypeError, r"'default_1' must be a number, got str"),
    ([0.25, True], TypeError, r"'default_1' must be a number, got bool"),
    ("0.5", TypeError, "number or a list of numbers"),
])
def test_set_adapters_checks_every_weight_before_applying_any(weights, error, pattern, pipe, adapter_dir, tmp_path):
    pipe.load_serial_lora_weights(adapter_dir)
    pipe.load_serial_lora_weights(make_adapter(tmp_path, seed=8))
    pipe.set_serial_lora_adapters(["default", "default_1"], [1.0, 1.0])
    inputs = transformer_inputs(pipe.transformer)
    with torch.no_grad():
        before = pipe.transformer(**inputs).sample
    with pytest.raises(error, match=pattern):
        pipe.set_serial_lora_adapters(["default", "default_1"], weights)
    with torch.no_grad():
        assert torch.equal(pipe.transformer(**inputs).sample, before)  # "default" is still at 1.0, not 0.25


# ------------------------------------------------------------------------------------------ SD3 hosts
def test_sd3_hosts_cover_last_block_and_sd35_attn2(tmp_path):
    pipe = tiny_sd3_pipeline(dual_attention=True)
    transformer = pipe.transformer
    diffusers_loader.add_serial_lora(transformer, SerialLoraConfig(rank=2, streams=("image", "text")))
    adapted = {(name, stream) for name, module in serial_lora_modules(transformer) for stream in module["default"]}
    assert adapted == {
        ("transformer_blocks.0.attn", "image"), ("transformer_blocks.0.attn", "text"),
        ("transformer_blocks.0.attn2", "image"),  # SD3.5 dual attention: image tokens only
        ("transformer_blocks.1.attn", "image"), ("transformer_blocks.1.attn", "text"),  # context_pre_only block
    }
    assert transformer.transformer_blocks[1].attn.context_pre_only
    assert transformer.transformer_blocks[1].attn.to_add_out is None
    randomise(transformer, 1)
    unfused = generate(pipe)
    pipe.fuse_serial_lora()
    torch.testing.assert_close(generate(pipe), unfused, atol=FUSED_TOLERANCE, rtol=0)
    pipe.unfuse_serial_lora()
    path = pipe.save_serial_lora_weights(tmp_path)
    assert "transformer_blocks.0.attn2.serial_lora.image.down.weight" in load_file(path)


def test_default_training_config_adapts_the_image_stream_only():
    transformer = tiny_sd3_transformer(dual_attention_layers=(0,))
    diffusers_loader.add_serial_lora(transformer)
    streams = {stream for _, module in serial_lora_modules(transformer) for stream in module["default"]}
    assert streams == {"image"}
    assert len(list(serial_lora_modules(transformer))) == 3


def test_every_stream_feeds_its_three_projections_and_nothing_else():
    """diffusers' joint processor calls q/k/v of each stream as modules on one tensor: each gets
    x + s·B A x; the output projections and the block's residual path keep the original x."""
    transformer = tiny_sd3_transformer(dual_attention_layers=(0,))
    diffusers_loader.add_serial_lora(transformer, SerialLoraConfig(rank=2, streams=("image", "text")))
    randomise(transformer, 2)
    calls, inputs = {}, {}
    for attention_name, wrapper in serial_lora_modules(transformer):
        attn = wrapper.attention
        attn.register_forward_pre_hook(
            lambda m, a, k, n=attention_name: inputs.__setitem__(n, {"image": k["hidden_states"],
                                                                     "text": k.get("encoder_hidden_states")}),
            with_kwargs=True)
        for stream, spec in wrapper.stream_specs.items():
            for projection in spec.projections:
                wrapper.projection(projection).register_forward_pre_hook(
                    lambda m, a, key=(attention_name, stream, projection): calls.setdefault(key, []).append(a[0]))
    with torch.no_grad():
        transformer(**transformer_inputs(transformer))
    assert len(calls) == 3 * 5
    for attention_name, wrapper in serial_lora_modules(transformer):
        for stream, adapter in wrapper["default"].items():
            x = inputs[attention_name][stream]
            expected = x + adapter.scaling * (x @ adapter.down.weight.T) @ adapter.up.weight.T
            seen = [calls[(attention_name, stream, p)] for p in wrapper.stream_specs[stream].projections]
            assert all(len(s) == 1 for s in seen)
            for s in seen:
                torch.testing.assert_close(s[0], expected, atol=1e-5, rtol=0)
            assert seen[0][0] is seen[1][0] is seen[2][0]  # computed once per stream


@pytest.mark.parametrize("pipeline_class", [StableDiffusion3Img2ImgPipeline, StableDiffusion3PAGPipeline],
                         ids=lambda c: c.__name__)
def test_other_sd3_pipelines_and_pag_processors_apply_the_adapter(pipeline_class, base_pipe, adapter_dir):
    """Other pipelines with SD3's LoRA mixin; PAG swaps in its own joint processors, which must call the
    projections as modules too (fused == unfused, and both differ from the base)."""
    accepted = inspect.signature(pipeline_class.__init__).parameters
    components = {k: v for k, v in copy.deepcopy(base_pipe.components).items() if k in accepted}
    kwargs = dict(pag_applied_layers=["blocks.0"]) if pipeline_class is StableDiffusion3PAGPipeline else {}
    pipe = pipeline_class(**components, **kwargs)
    call = dict(prompt=PROMPT, num_inference_steps=2, height=32, width=32, max_sequence_length=16, output_type="pt")
    if pipeline_class is StableDiffusion3Img2ImgPipeline:
        call.update(image=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)), strength=1.0)
    run = lambda: pipe(generator=torch.Generator().manual_seed(0), **call).images  # noqa: E731
    base = run()
    pipe.load_serial_lora_weights(adapter_dir)
    unfused = run()
    assert (unfused - base).abs().max() > 1e-3
    pipe.fuse_serial_lora()
    torch.testing.assert_close(run(), unfused, atol=FUSED_TOLERANCE, rtol=0)
    pipe.unload_serial_lora_weights()
    assert torch.equal(run(), base)


@pytest.mark.parametrize("rank", [4, 8])
def test_image_stream_has_a_quarter_of_peft_lora_parameters(rank):
    serial = tiny_sd3_transformer()
    diffusers_loader.add_serial_lora(serial, SerialLoraConfig(rank=rank, streams=("image",)))
    serial_count = sum(p.numel() for p in serial_lora_parameters(serial))
    lora = tiny_sd3_transformer()
    inject_adapter_in_model(LoraConfig(r=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), lora)
    lora_count = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    width = serial.config.num_attention_heads * serial.config.attention_head_dim
    assert serial_count == len(serial.transformer_blocks) * 2 * width * rank
    assert 4 * serial_count == lora_count


# ------------------------------------------------------------------------------------------ export to standard LoRA
@pytest.mark.parametrize("streams", [("image",), ("image", "text")], ids="+".join)
def test_export_to_standard_lora_loads_in_stock_diffusers(streams, base_pipe, tmp_path):
    adapter = make_adapter(tmp_path / "serial", seed=3, streams=streams, rank=4)
    serial_pipe = copy.deepcopy(base_pipe)
    serial_pipe.load_serial_lora_weights(adapter)
    serial_images = generate(serial_pipe)
    exported = export_to_lora(serial_pipe, tmp_path / "lora.safetensors")
    tensors = load_file(exported)
    assert all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in tensors)
    assert len(tensors) == 2 * 3 * len(read_file(adapter).weights)
    lora_pipe = copy.deepcopy(base_pipe)
    lora_pipe.load_lora_weights(str(exported), adapter_name="exported")  # unmodified diffusers + peft
    config = lora_pipe.transformer.peft_config["exported"]
    assert config.r == config.lora_alpha == 4  # the up matrices carry the scale: LoRA scale exactly 1
    assert lora_pipe.transformer.transformer_blocks[0].attn.to_q.scaling["exported"] == 1.0
    torch.testing.assert_close(generate(lora_pipe), serial_images, atol=FUSED_TOLERANCE, rtol=0)
    assert sum(t.numel() for t in tensors.values()) > 2 * read_file(adapter).num_parameters


def test_export_without_a_name_takes_the_only_adapter_or_the_active_ones_combined(base_pipe, tmp_path):
    """After load_serial_lora_weights(..., adapter_name="style"), export_to_lora(pipe, path) exports "style";
    with two active adapters it exports their summed change (rank 4 + 2), which stock diffusers reproduces."""
    a = make_adapter(tmp_path / "a", seed=1, streams=("image", "text"), rank=4)
    b = make_adapter(tmp_path / "b", seed=2, streams=("image",), rank=2)
    serial_pipe = copy.deepcopy(base_pipe)
    serial_pipe.load_serial_lora_weights(a, adapter_name="style")
    only = load_file(export_to_lora(serial_pipe, tmp_path / "only.safetensors"))
    assert only.keys() == load_file(export_to_lora(serial_pipe, tmp_path / "named.safetensors", "style")).keys()
    serial_pipe.load_serial_lora_weights(b, adapter_name="subject")
    serial_pipe.set_serial_lora_adapters(["style", "subject"], [0.7, 0.5])
    serial_images = generate(serial_pipe)
    exported = export_to_lora(serial_pipe, tmp_path / "both.safetensors")
    tensors = load_file(exported)
    assert tensors["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape[0] == 6
    assert not tensors["transformer.transformer_blocks.0.attn.add_q_proj.lora_B.weight"][:, 4:].any()  # b: no text stream
    lora_pipe = copy.deepcopy(base_pipe)
    lora_pipe.load_lora_weights(str(exported), adapter_name="exported")
    torch.testing.assert_close(generate(lora_pipe), serial_images, atol=FUSED_TOLERANCE, rtol=0)
    serial_pipe.set_serial_lora_adapters("subject", 0.5)  # "style" switched off: "subject" alone
    assert load_file(export_to_lora(serial_pipe, tmp_path / "sub.safetensors")).keys() == \
        load_file(export_to_lora(serial_pipe, tmp_path / "sub2.safetensors", "subject")).keys()
    with pytest.raises(SerialLoraError, match=r"'nope'.*\['style', 'subject'\]"):
        export_to_lora(serial_pipe, tmp_path / "x.safetensors", "nope")
    serial_pipe.set_serial_lora_adapters(["style", "subject"], [0.0, 0.0])
    with pytest.raises(SerialLoraError, match=r"none of .*\['style', 'subject'\].* active"):
        export_to_lora(serial_pipe, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_export_lora_cli_from_a_saved_transformer_folder(base_pipe, adapter_dir, tmp_path, capsys):
    base_pipe.transformer.save_pretrained(tmp_path / "pipeline" / "transformer")
    out = tmp_path / "lora.safetensors"
    code = cli_main(["export-lora", str(adapter_dir / WEIGHT), str(out), "--base", str(tmp_path / "pipeline")])
    assert code == 0 and "projections" in capsys.readouterr().out
    with safe_open(out, framework="pt") as handle:
        meta = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert meta["transformer.r"] == meta["transformer.lora_alpha"] == read_file(adapter_dir / WEIGHT).rank
    serial_pipe = copy.deepcopy(base_pipe)
    serial_pipe.load_serial_lora_weights(adapter_dir)
    lora_pipe = copy.deepcopy(base_pipe)
    lora_pipe.load_lora_weights(str(out))
    torch.testing.assert_close(generate(lora_pipe), generate(serial_pipe), atol=FUSED_TOLERANCE, rtol=0)


def test_export_refuses_a_fused_pipeline(pipe, adapter_dir, tmp_path):
    pipe.load_serial_lora_weights(adapter_dir)
    pipe.fuse_serial_lora()
    with pytest.raises(SerialLoraError, match="merged"):
        export_to_lora(pipe, tmp_path / "lora.safetensors")
    assert not (tmp_path / "lora.safetensors").exists()


# ------------------------------------------------------------------------------------------ where files come from
def _prefilled_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """The layout huggingface_hub's cache uses (models--user--name/snapshots/<commit>, refs/main)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for name, source in files.items():
        (repo / "snapshots" / commit / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, repo / "snapshots" / commit / name)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.mark.parametrize("how", ["arguments", "environment"])
def test_load_from_a_prefilled_hub_cache(how, pipe, adapter_dir, base_images, tmp_path, monkeypatch):
    """The hub path goes through huggingface_hub's own download/cache code, offline."""
    cache = tmp_path / "hub"
    _prefilled_hub_cache(cache, "someone/sd3-serial-lora", {WEIGHT: adapter_dir / WEIGHT,
                                                            f"v2/{WEIGHT}": adapter_dir / WEIGHT})
    if how == "arguments":
        kwargs = dict(cache_dir=str(cache), local_files_only=True)
    else:
        # huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE into its constants when first imported.
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        kwargs = {}
    pipe.load_serial_lora_weights("someone/sd3-serial-lora", **kwargs)
    pipe.load_serial_lora_weights("someone/sd3-serial-lora", subfolder="v2", adapter_name="v2", **kwargs)
    expected = copy.deepcopy(pipe)
    expected.unload_serial_lora_weights()
    expected.load_serial_lora_weights(adapter_dir / WEIGHT)
    pipe.set_serial_lora_adapters("default")
    images = generate(pipe)
    assert torch.equal(images, generate(expected)) and not torch.equal(images, base_images)
    before = snapshot(pipe)
    with pytest.raises(LocalEntryNotFoundError):
        pipe.load_serial_lora_weights("someone/other", adapter_name="x", **kwargs)
    assert_same(before, snapshot(pipe))


def test_folder_with_weight_name_and_model_level_entry(adapter_dir, tmp_path):
    renamed = tmp_path / "my_style.safetensors"
    shutil.copy(adapter_dir / WEIGHT, renamed)
    shutil.copy(adapter_dir / WEIGHT, tmp_path / "another.safetensors")
    transformer = tiny_sd3_transformer()
    transformer.load_serial_lora_adapter(tmp_path, weight_name="my_style.safetensors", adapter_name="style")
    reference = tiny_sd3_transformer()
    reference.load_serial_lora_adapter(adapter_dir / WEIGHT)
    inputs = transformer_inputs(transformer)
    with torch.no_grad():
        assert torch.equal(transformer(**inputs).sample, reference(**inputs).sample)
    with pytest.raises(SerialLoraFileError, match="weight_name"):  # two files, no default name: ambiguous
        tiny_sd3_transformer().load_serial_lora_adapter(tmp_path)


# ------------------------------------------------------------------------------------------ devices, dtypes, offload
@pytest.mark.parametrize("order", ["load_then_offload", "offload_then_load"])
def test_model_cpu_offload_path(order, pipe, adapter_dir):
    reference = copy.deepcopy(pipe)
    reference.load_serial_lora_weights(adapter_dir)
    expected = generate(reference)
    if order == "load_then_offload":
        pipe.load_serial_lora_weights(adapter_dir)
        pipe.enable_model_cpu_offload(device="cpu")
    else:
        pipe.enable_model_cpu_offload(device="cpu")
        pipe.load_serial_lora_weights(adapter_dir)
    assert hasattr(pipe.transformer, "_hf_hook")  # accelerate's offload hook is in the call path
    assert torch.equal(generate(pipe), expected)
    pipe.fuse_serial_lora()
    torch.testing.assert_close(generate(pipe), expected, atol=FUSED_TOLERANCE, rtol=0)
    pipe.unfuse_serial_lora()
    assert torch.equal(generate(pipe), expected)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_sequential_offload_of_the_adapters_is_a_clear_error_unless_fused(fused, adapter_dir):
    """enable_sequential_cpu_offload() moves every weight, the adapters' too, to the meta device; the
    adapters read their weights directly, so unfused this must be an error, not garbage images."""
    transformer = tiny_sd3_transformer()
    transformer.load_serial_lora_adapter(adapter_dir)
    inputs = transformer_inputs(transformer)
    with torch.no_grad():
        expected = transformer(**inputs).sample
    if fused:
        diffusers_loader.transformer.fuse(transformer)
    cpu_offload(transformer, execution_device=torch.device("cpu"))  # what the pipeline method calls per model
    assert transformer.transformer_blocks[0].attn.serial_lora["default"]["image"].down.weight.is_meta
    with torch.no_grad():
        if fused:
            torch.testing.assert_close(transformer(**inputs).sample, expected, atol=1e-5, rtol=0)
        else:
            with pytest.raises(SerialLoraError, match="enable_model_cpu_offload"):
                transformer(**inputs)


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_file_and_transformer_dtypes_may_differ(file_dtype, model_dtype, tmp_path):
    """The adapter is created in the projections' dtype and the file's tensors are cast into it."""
    path = make_adapter(tmp_path, seed=4, dtype=file_dtype)
    assert read_file(path).metadata["dtype"] == str(file_dtype).removeprefix("torch.")
    reference = tiny_sd3_transformer()
    reference.load_serial_lora_adapter(path)
    transformer = tiny_sd3_transformer().to(model_dtype)
    transformer.load_serial_lora_adapter(path)
    for (name, ours), (_, theirs) in zip(serial_lora_modules(transformer), serial_lora_modules(reference)):
        for stream, adapter in ours["default"].items():
            assert adapter.down.weight.dtype == model_dtype
            assert torch.equal(adapter.up.weight, theirs["default"][stream].up.weight.to(model_dtype)), name
    inputs = transformer_inputs(transformer)
    with torch.no_grad():
        expected = reference(**inputs).sample
        got = transformer(**{k: v.to(model_dtype) if k != "timestep" else v for k, v in inputs.items()}).sample
    assert got.dtype == model_dtype
    tolerance = 1e-5 if model_dtype == torch.float32 else 0.15
    torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=0.05 if tolerance > 1e-5 else 0)


# ------------------------------------------------------------------------------------------ bad input
def _bad_files(tmp_path: Path, adapter_dir: Path) -> dict[str, tuple[Path, str]]:
    bad = {}
    bad["deeper model"] = (make_adapter(tmp_path / "deep", num_layers=3), "3 attention modules|attention module")
    bad["wider model"] = (make_adapter(tmp_path / "wide", attention_head_dim=16), r"shape \(4, 64\)")
    bad["SD3.5 file, SD3 model"] = (make_adapter(tmp_path / "dual", dual_attention_layers=(0,)), "attention modules")
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
    bad["missing file"] = (tmp_path / "nowhere" / "x.safetensors", "neither an existing local file")
    (tmp_path / "empty").mkdir()
    bad["folder without a file"] = (tmp_path / "empty", "0 .safetensors files")
    return bad


BAD_FILES = ["deeper model", "wider model", "SD3.5 file, SD3 model", "standard LoRA", "truncated", "pickle",
             "corrupt", "missing file", "folder without a file"]


@pytest.mark.parametrize("loaded", ["fresh", "with an adapter"])
@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files_raise_and_leave_the_pipeline_unchanged(case, loaded, pipe, adapter_dir, tmp_path):
    path, pattern = _bad_files(tmp_path, adapter_dir)[case]
    if loaded == "with an adapter":
        pipe.load_serial_lora_weights(adapter_dir, adapter_name="existing")
    before = snapshot(pipe)
    with pytest.raises(SerialLoraFileError, match=pattern):
        pipe.load_serial_lora_weights(path, adapter_name="new")
    assert_same(before, snapshot(pipe))


def _fuse_qkv(pipe) -> None:
    pipe.transformer.fuse_qkv_projections()


def _standard_lora_on_the_projections(pipe) -> None:
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v"]), pipe.transformer)


def _weights_on_the_meta_device(pipe) -> None:
    # What enable_sequential_cpu_offload() leaves between calls (it cannot run on this CPU-only torch).
    pipe.transformer.transformer_blocks[0].attn.to_q.to("meta")


BAD_STATES = {
    "weights on the meta device": (_weights_on_the_meta_device, "meta device"),
    "fused qkv projections": (_fuse_qkv, "unfuse_qkv_projections"),
    "standard LoRA already on q/k/v": (_standard_lora_on_the_projections, "cannot load a Serial LoRA: .*PEFT"),
}


@pytest.mark.parametrize("case", sorted(BAD_STATES))
def test_pipelines_whose_projections_would_bypass_the_adapter_are_refused(case, pipe, adapter_dir):
    prepare, pattern = BAD_STATES[case]
    prepare(pipe)
    before = snapshot(pipe)
    with pytest.raises(SerialLoraError, match=pattern):
        pipe.load_serial_lora_weights(adapter_dir)
    assert_same(before, snapshot(pipe))


def test_standard_lora_loaded_after_the_serial_lora_runs_alongside_it(pipe, base_pipe, adapter_dir, tmp_path):
    other = make_adapter(tmp_path / "other", seed=6)
    standard_pipe = copy.deepcopy(base_pipe)
    standard_pipe.load_serial_lora_weights(other)
    standard = export_to_lora(standard_pipe, tmp_path / "standard.safetensors")
    standard_images = generate(standard_pipe)
    pipe.load_serial_lora_weights(adapter_dir)
    serial_images = generate(pipe)
    pipe.load_lora_weights(str(standard), adapter_name="standard")  # PEFT wraps to_q/k/v around our hooks
    assert (generate(pipe) - serial_images).abs().max() > 1e-3
    before = snapshot(pipe)
    with pytest.raises(SerialLoraError, match=r"cannot fuse the Serial LoRA: .*unload_lora_weights"):
        pipe.fuse_serial_lora()
    assert_same(before, snapshot(pipe))
    pipe.set_serial_lora_scale(0.0)
    torch.testing.assert_close(generate(pipe), standard_images, atol=FUSED_TOLERANCE, rtol=0)
    pipe.set_serial_lora_scale(1.0)
    pipe.unload_lora_weights()
    assert torch.equal(generate(pipe), serial_images)


def test_bad_arguments_are_clear_errors(pipe, adapter_dir):
    before = snapshot(pipe)
    with pytest.raises(TypeError, match="low_cpu_mem_usage"):
        pipe.load_serial_lora_weights(adapter_dir, low_cpu_mem_usage=True)
    with pytest.raises(SerialLoraError, match="not loaded"):
        pipe.load_serial_lora_weights(adapter_dir, adapter_name="nope", hotswap=True)
    with pytest.raises(SerialLoraError, match="no Serial LoRA"):
        pipe.fuse_serial_lora()
    assert_same(before, snapshot(pipe))
    pipe.load_serial_lora_weights(adapter_dir)
    with pytest.raises(SerialLoraError, match=r"unknown Serial LoRA adapter\(s\) \['nope'\]"):
        pipe.set_serial_lora_adapters(["default", "nope"], [1.0, 1.0])
    with pytest.raises(SerialLoraError, match="2 adapter names and 1 adapter_weights"):
        pipe.set_serial_lora_adapters(["default", "default"], [1.0])


def test_file_for_another_model_names_both_architectures(pipe, tmp_path):
    path = make_adapter(tmp_path, attention_head_dim=16)
    with pytest.raises(SerialLoraFileError) as err:
        pipe.load_serial_lora_weights(path)
    assert "width=64" in str(err.value) and "width=32" in str(err.value)


@pytest.mark.parametrize("call", ["load_lora_weights", "lora_state_dict"])
def test_serial_lora_refused_by_stock_lora_loader(call, pipe, adapter_dir):
    before = snapshot(pipe)
    with pytest.raises(SerialLoraFileError, match="load_serial_lora_weights"):
        getattr(pipe, call)(str(adapter_dir / WEIGHT))
    assert_same(before, snapshot(pipe))
    assert not getattr(pipe.transformer, "peft_config", None)


# ------------------------------------------------------------------------------------------ training
def test_trained_adapter_reproduces_the_trained_transformer(tmp_path, base_pipe):
    """A few LoRA+ steps in diffusers, save, then a fresh pipeline reproduces the trained outputs exactly."""
    pipe = copy.deepcopy(base_pipe)
    transformer = pipe.transformer
    diffusers_loader.add_serial_lora(transformer, SerialLoraConfig(rank=4, dropout=0.1, streams=("image", "text")))
    transformer.train()
    groups = loraplus_param_groups(transformer, lr=1e-3, ratio=20)
    optimizer = torch.optim.AdamW(groups)
    assert sum(len(g["params"]) for g in groups) == len(list(serial_lora_parameters(transformer)))
    assert all(not p.requires_grad for n, p in transformer.named_parameters() if ".serial_lora." not in n)
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


@pytest.mark.parametrize(
    ("source", "is_repo_id"),
    [("someone/adapter", True), ("someone/adapter.ckpt", False), ("./someone/adapter", False),
     ("~/adapter", False), ("a/b/c", False), ("adapter.safetensors", False), ("someone/x.bin", False)],
)
def test_hub_id_guess_is_the_cores_one_rule(source, is_repo_id, monkeypatch, tmp_path):
    """resolve_adapter_file and the export's base-model loader call the one serial_lora_core rule: a string that
    is not a local path is downloaded only when it reads as `owner/name`, else refused without the hub."""
    import huggingface_hub

    from serial_lora_core.export import is_hub_repo_id

    monkeypatch.chdir(tmp_path)
    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, *a, **k: asked.append(repo) or "x")
    assert is_hub_repo_id(source) is is_repo_id
    if is_repo_id:
        assert diffusers_loader.resolve_adapter_file(source) == "x" and asked == [source]
    else:
        with pytest.raises(SerialLoraFileError, match="neither an existing local file or folder nor a hub repo id"):
            diffusers_loader.resolve_adapter_file(source)
        assert asked == []
