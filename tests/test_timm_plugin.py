"""The timm plugin, through `timm.create_model` itself and timm's real registry (offline, CPU, tiny configs)."""

from __future__ import annotations

import dataclasses

import huggingface_hub.constants
import pytest
import timm
import timm.models
import torch
from safetensors.torch import save_file
from torch import nn

import timm_plugin
from serial_lora_core import (
    SerialLoraAttention,
    SerialLoraError,
    SerialLoraFileError,
    adapter_config,
    count_trainable_parameters,
    load_serial_lora,
    merge_and_unload_serial_lora,
    merge_serial_lora,
    read_file,
    save_serial_lora,
    serial_lora_modules,
    unmerge_serial_lora,
)
from timm_models import (
    VIT_OVERRIDES,
    BY_NAME,
    FAMILIES,
    FAMILY_IDS,
    base_state_dict,
    hand_merged_state_dict,
    randomize_adapters,
)

TAG = timm_plugin.TAG
parametrize_families = pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)


def _adapter_names(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_parameters() if ".serial_lora." in name}


def _trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _base_file(family, tmp_path, seed: int = 5):
    """A plain model of `family` and its weights saved as a local pretrained file."""
    plain = family.create(tag=False, seed=seed)
    path = tmp_path / f"{family.architecture}_base.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(path))
    return plain, str(path)


# ---------------------------------------------------------------- registration


def _builds_and_is_supported(architecture: str) -> bool:
    """Build the plain architecture on the meta device (one block when it allows) and ask the plugin."""
    for overrides in (dict(depth=1), {}):
        try:
            with torch.device("meta"):
                model = timm_plugin.base_entrypoint(architecture)(pretrained=False, **overrides)
        except AssertionError:  # e.g. sapiens2's per-block num_kv_heads needs the real depth
            continue
        return not timm_plugin.unsupported_attention(model)
    raise AssertionError(f"{architecture} does not build on the meta device")


def test_tag_registered_for_exactly_the_supported_architectures():
    architectures = [a for family in timm_plugin.FAMILIES for a in timm.list_models(module=family)]
    supported = {a for a in architectures if _builds_and_is_supported(a)}
    assert set(timm_plugin.SERIAL_LORA_ARCHITECTURES) == supported
    assert set(timm_plugin.serial_lora_architectures()) == supported
    assert set(architectures) - supported == timm_plugin.UNSUPPORTED
    for family in FAMILIES:
        assert family.architecture in supported


def test_tag_listed_and_resolved_by_timms_registry():
    registered = timm_plugin.SERIAL_LORA_ARCHITECTURES
    listed = timm.list_models(f"*.{TAG}", include_tags=True)
    assert len(listed) == len(registered) and set(listed) == {f"{a}.{TAG}" for a in registered}
    with_weights = {f"{a}.{TAG}" for a in registered if timm.models.is_model_pretrained(a)}
    assert set(timm.list_pretrained(f"*.{TAG}")) == with_weights
    assert "vit_base_patch16_clip_224.serial_lora" in with_weights
    for family in FAMILIES:
        tagged_cfg = timm.models.get_pretrained_cfg(family.tagged)
        default_cfg = timm.models.get_pretrained_cfg(family.architecture)
        assert tagged_cfg == dataclasses.replace(default_cfg, tag=TAG)  # same hub id, url, input size
        assert default_cfg.tag != TAG  # the architecture's default tag is untouched
        assert timm.is_model(family.tagged)
        assert family.tagged in timm.models.get_arch_pretrained_cfgs(family.architecture)
    clip_tags = timm.list_models("vit_base_patch16_clip_224", include_tags=True)
    assert "vit_base_patch16_clip_224.openai" in clip_tags and "vit_base_patch16_clip_224.serial_lora" in clip_tags


def test_deprecated_name_with_the_tag_is_refused_not_silently_plain():
    # timm's shim for the old name calls the unwrapped entry point: it would build a model without adapters.
    with pytest.raises(ValueError, match=r"vit_tiny_patch16_224\.serial_lora"):
        timm.create_model(f"vit_tiny_patch16_224_in21k.{TAG}", **VIT_OVERRIDES)
    with pytest.warns(UserWarning, match="deprecated"):
        model = timm.create_model("vit_tiny_patch16_224_in21k", **VIT_OVERRIDES)
    assert not list(serial_lora_modules(model))


def test_unsupported_architecture_has_no_tag():
    with pytest.raises(ValueError, match=r"no '\.serial_lora' tag: .*parallel block"):
        timm.create_model(f"vit_base_patch16_xp_224.{TAG}")


@parametrize_families
def test_untagged_entrypoint_behaves_as_before(family):
    model = family.create(tag=False, seed=7)
    torch.manual_seed(7)
    reference = timm_plugin.base_entrypoint(family.architecture)(pretrained=False, **family.overrides)
    assert type(model) is type(reference)
    assert not list(serial_lora_modules(model))
    assert model.pretrained_cfg == reference.pretrained_cfg
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    assert all(p.requires_grad for p in model.parameters())


def test_serial_lora_arguments_without_the_tag_are_refused():
    with pytest.raises(TypeError, match=r"vit_base_patch16_224\.serial_lora"):
        timm.create_model("vit_base_patch16_224", serial_lora_rank=4, **VIT_OVERRIDES)


def test_resolved_tag_cfg_also_builds_serial_lora():
    # Scripts that resolve the pretrained cfg first (e.g. timm's train.py) pass it instead of the tag.
    family = BY_NAME["vit"]
    model = family.create(tag=False, pretrained_cfg=timm.models.get_pretrained_cfg(family.tagged))
    assert len(list(serial_lora_modules(model))) == family.overrides["depth"]


# ---------------------------------------------------------------- keyword arguments


@pytest.mark.parametrize(
    "kwargs, rank, alpha, scale, dropout, rslora",
    [
        ({}, 8, 8.0, 1.0, 0.0, False),
        (dict(serial_lora_rank=4), 4, 4.0, 1.0, 0.0, False),
        (dict(serial_lora_rank=4, serial_lora_alpha=8), 4, 8.0, 2.0, 0.0, False),
        (dict(serial_lora_rank=4, serial_lora_alpha=8, serial_lora_rslora=True), 4, 8.0, 4.0, 0.0, True),
        (dict(serial_lora_dropout=0.25), 8, 8.0, 1.0, 0.25, False),
    ],
)
def test_serial_lora_keyword_arguments(kwargs, rank, alpha, scale, dropout, rslora):
    model = BY_NAME["clip_vit"].create(**kwargs)
    config = adapter_config(model)
    assert (config.rank, config.alpha, config.dropout, config.use_rslora) == (rank, alpha, dropout, rslora)
    assert model.serial_lora_architecture == "vit_base_patch16_clip_224"
    adapters = [a for _, m in serial_lora_modules(model) for a in m["default"].values()]
    assert len(adapters) == 2
    for adapter in adapters:
        assert adapter.down.weight.shape == (rank, 64) and adapter.up.weight.shape == (64, rank)
        assert adapter.scaling == pytest.approx(scale)
        assert (adapter.dropout.p if isinstance(adapter.dropout, nn.Dropout) else 0.0) == dropout
        assert torch.count_nonzero(adapter.up.weight) == 0


def test_target_modules_selects_blocks():
    model = BY_NAME["vit"].create(serial_lora_target_modules=r"blocks\.1\.")
    assert [name for name, _ in serial_lora_modules(model)] == ["blocks.1.attn"]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(serial_lora_rank=0), ValueError, "rank"),
        (dict(serial_lora_dropout=1.5), ValueError, "dropout"),
        (dict(serial_lora_rslora="yes"), TypeError, "serial_lora_rslora"),
        (dict(serial_lora_weights=3), TypeError, "serial_lora_weights"),
        (dict(serial_lora_ranks=4), TypeError, "serial_lora_ranks"),
    ],
)
def test_invalid_keyword_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        BY_NAME["vit"].create(**kwargs)


@parametrize_families
@pytest.mark.parametrize("new_classes", [False, True], ids=["same_classes", "new_head"])
def test_only_adapters_and_a_new_head_are_trainable(family, new_classes):
    kwargs = dict(num_classes=7) if new_classes else {}
    model = family.create(**kwargs)
    if new_classes:
        assert model.num_classes != model.pretrained_cfg["num_classes"]
        heads = model.get_classifier()
        heads = heads if isinstance(heads, tuple) else (heads,)
        head_ids = {id(p) for head in heads for p in head.parameters()}
        expected = _adapter_names(model) | {n for n, p in model.named_parameters() if id(p) in head_ids}
        assert len(expected) > len(_adapter_names(model))
    else:
        expected = _adapter_names(model)
    assert _adapter_names(model)
    assert _trainable_names(model) == expected
    assert {m.host.name for _, m in serial_lora_modules(model)} == {family.host}


# ---------------------------------------------------------------- weights and equivalences


@parametrize_families
def test_pretrained_loads_base_weights_and_zero_init_equals_base(family, tmp_path):
    plain, path = _base_file(family, tmp_path)
    model = family.create(pretrained=True, pretrained_cfg_overlay=dict(file=path), seed=11)
    state = model.state_dict()
    for key, value in plain.state_dict().items():
        assert torch.equal(state[key], value), key
    images = family.images()
    with torch.no_grad():
        assert torch.equal(model(images), plain(images))


def test_pretrained_from_a_prefilled_hub_cache(tmp_path, monkeypatch):
    family = BY_NAME["clip_vit"]
    plain = family.create(tag=False, seed=5)
    hub_id = timm.models.get_pretrained_cfg(family.tagged).hf_hub_id
    assert hub_id == timm.models.get_pretrained_cfg(family.architecture).hf_hub_id
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / ("models--" + hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(repo / "snapshots" / commit / "model.safetensors"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = family.create(pretrained=True, cache_dir=str(tmp_path), seed=11)
    images = family.images()
    with torch.no_grad():
        assert torch.equal(model(images), plain(images))


def _outputs_and_attention(model: nn.Module, images: torch.Tensor, names=None):
    """The model's output and the outputs of its attention modules (the adapted ones, or `names`)."""
    names = list(names) if names is not None else [name for name, _ in serial_lora_modules(model)]
    captured = {}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda _m, _a, out, name=name: captured.__setitem__(name, out)) for name in names]
    with torch.no_grad():
        out = model(images)
    for handle in handles:
        handle.remove()
    assert captured.keys() == set(names)
    return out, captured


@parametrize_families
def test_adapter_output_equals_hand_computed_weights(family):
    model = family.create()
    randomize_adapters(model)
    base = family.create(tag=False)
    base.load_state_dict(base_state_dict(model))
    by_hand = family.create(tag=False)
    by_hand.load_state_dict(hand_merged_state_dict(model))
    images = family.images()
    out, attn = _outputs_and_attention(model, images)
    expected, expected_attn = _outputs_and_attention(by_hand, images, attn)
    _, unadapted_attn = _outputs_and_attention(base, images, attn)
    for name, value in attn.items():
        # Each attention's output moves (the adapter reaches q, k and v) and matches W(I + sBA) by hand.
        assert (value - unadapted_attn[name]).norm() > 1e-2 * unadapted_attn[name].norm(), name
        torch.testing.assert_close(value, expected_attn[name], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@parametrize_families
def test_save_and_load_round_trip(family, tmp_path):
    _, base = _base_file(family, tmp_path)
    model = family.create(pretrained=True, pretrained_cfg_overlay=dict(file=base), serial_lora_rank=4, serial_lora_alpha=6)
    randomize_adapters(model)
    path = save_serial_lora(model, tmp_path / "adapter.safetensors")
    assert read_file(path).architecture == family.architecture
    loaded = family.create(pretrained=True, pretrained_cfg_overlay=dict(file=base), serial_lora_weights=str(path), seed=12)
    config = adapter_config(loaded)
    assert (config.rank, config.alpha) == (4, 6.0)
    assert _trainable_names(loaded) == _adapter_names(model)
    images = family.images()
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(serial_lora_rank=8), "serial_lora_rank=8 contradicts"),
        (dict(serial_lora_rslora=True), "serial_lora_rslora=True contradicts"),
        (dict(serial_lora_target_modules="blocks"), "serial_lora_target_modules cannot be combined"),
    ],
)
def test_weights_with_contradicting_arguments_are_refused(kwargs, match, tmp_path):
    family = BY_NAME["vit"]
    path = save_serial_lora(family.create(serial_lora_rank=4), tmp_path / "adapter.safetensors")
    with pytest.raises(ValueError, match=match):
        family.create(serial_lora_weights=str(path), **kwargs)
    same = family.create(serial_lora_weights=str(path), serial_lora_rank=4, serial_lora_rslora=False)
    assert adapter_config(same).rank == 4


@parametrize_families
def test_merge_then_unload_gives_a_plain_timm_model(family):
    model = family.create()
    randomize_adapters(model)
    images = family.images()
    with torch.no_grad():
        expected = model(images)
        merge_serial_lora(model)
        torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-5)
        unmerge_serial_lora(model)
        assert torch.equal(model(images), expected)
        merge_and_unload_serial_lora(model)
        assert not any(isinstance(m, SerialLoraAttention) for m in model.modules())
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
        plain = family.create(tag=False, seed=13)
        assert model.state_dict().keys() == plain.state_dict().keys()
        plain.load_state_dict(model.state_dict(), strict=True)
        torch.testing.assert_close(plain(images), expected, rtol=1e-4, atol=1e-5)
        assert torch.equal(plain(images), model(images))


# ---------------------------------------------------------------- compile and checkpointing


def test_torch_compile_inductor_matches_eager():
    family = BY_NAME["clip_vit"]
    model = family.create()
    randomize_adapters(model)
    images = family.images()
    with torch.no_grad():
        eager = model(images)
        compiled = torch.compile(model, backend="inductor")(images)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", [BY_NAME["beit"], BY_NAME["eva02_fused_qkv_bias"], BY_NAME["eva02_split_qkv"]],
                         ids=["beit", "eva02_fused_qkv_bias", "eva02_split_qkv"])
def test_fx_tracing_works_and_jit_script_is_refused_on_eva_and_beit(family):
    # Their attention reads the qkv weight itself: the adapter hooks the forward argument, which fx
    # traced as a proxy (and failed on); torch.jit.script cannot run hooks at all.
    model = family.create()
    randomize_adapters(model)
    images = family.images()
    with torch.no_grad():
        eager = model(images)
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(images), eager, rtol=1e-5, atol=1e-5)
    with pytest.raises(SerialLoraError, match="merge_and_unload_serial_lora"):
        torch.jit.script(model)


def _loss_and_grads(model: nn.Module, images: torch.Tensor, forward=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and the trainable parameters' gradients of a squared-output loss (`forward` defaults to `model`)."""
    model.zero_grad(set_to_none=True)
    out = (model if forward is None else forward)(images)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", [BY_NAME["beit"], BY_NAME["eva02_split_qkv"]], ids=["beit", "eva02_split_qkv"])
def test_torch_compile_training_step_matches_eager(family):
    model = family.create(num_classes=3)
    randomize_adapters(model)
    images = family.images()
    eager_out, eager_grads = _loss_and_grads(model, images)
    compiled_out, compiled_grads = _loss_and_grads(model, images, torch.compile(model, backend="aot_eager"))
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-4, atol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) > 2
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6)


@parametrize_families
def test_grad_checkpointing_gives_same_outputs_and_grads(family):
    model = family.create(num_classes=3)
    randomize_adapters(model)
    images = family.images()
    first = next(m for _, m in serial_lora_modules(model))["default"]["input"]
    calls = []
    low_rank = first._add_to
    first._add_to = lambda *args: calls.append(1) or low_rank(*args)  # counts the adapter's computations
    out, grads = _loss_and_grads(model, images)
    assert len(calls) == 1
    model.set_grad_checkpointing(True)
    calls.clear()
    ckpt_out, ckpt_grads = _loss_and_grads(model, images)
    assert len(calls) == 2  # the block was recomputed in backward, adapter included
    assert torch.equal(ckpt_out, out)
    assert ckpt_grads.keys() == grads.keys() and any(".serial_lora." in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- parameter count


def test_parameter_count_vit_b_clip_rank_32():
    """Serial LoRA on ViT-B/16 CLIP at r=32: 12 blocks x (A: 32x768 + B: 768x32) = 589,824.

    Compared with PEFT's LoRA on separate q, k, v and o projections of the same width and depth
    (EVA02-B, whose attention has q_proj/k_proj/v_proj/proj; PEFT on timm's fused `qkv` would make
    one pair with 3d outputs instead): 12 x 4 x (32x768 + 768x32) = 4 x 589,824. Built on the meta device.
    """
    expected = 12 * 2 * 768 * 32
    assert expected == 589_824
    from peft import LoraConfig, get_peft_model

    with torch.device("meta"):
        clip = timm.create_model(f"vit_base_patch16_clip_224.{TAG}", serial_lora_rank=32)
        eva = timm.create_model(f"eva02_base_patch14_224.{TAG}", serial_lora_rank=32)
        lora = get_peft_model(
            timm.create_model("eva02_base_patch14_224"),
            LoraConfig(r=32, target_modules=r".*attn\.(q_proj|k_proj|v_proj|proj)"),
        )
    assert count_trainable_parameters(clip) == expected
    assert count_trainable_parameters(eva) == expected
    assert count_trainable_parameters(lora) == 4 * expected


# ---------------------------------------------------------------- refusals


_WRONG_FILES = {
    # case: (file's architecture and overrides, rank), (model's architecture and overrides, rank), message
    "width": (("vit_base_patch16_224", VIT_OVERRIDES, 4), ("deit_small_patch16_224", dict(VIT_OVERRIDES, embed_dim=96), 4), "96 features"),
    "depth": (("vit_base_patch16_clip_224", VIT_OVERRIDES, 4), ("vit_base_patch16_224", dict(VIT_OVERRIDES, depth=3), 4), "2 attention modules"),
    "rank": (("vit_base_patch16_224", VIT_OVERRIDES, 4), ("vit_base_patch16_clip_224", VIT_OVERRIDES, 8), "rank 8, the file rank 4"),
}


@pytest.mark.parametrize("case", list(_WRONG_FILES))
def test_file_of_another_architecture_is_refused(case, tmp_path):
    (file_arch, file_overrides, file_rank), (arch, overrides, rank), message = _WRONG_FILES[case]
    torch.manual_seed(0)
    source = timm.create_model(f"{file_arch}.{TAG}", serial_lora_rank=file_rank, **file_overrides)
    path = save_serial_lora(source, tmp_path / "adapter.safetensors")

    torch.manual_seed(0)
    model = timm.create_model(f"{arch}.{TAG}", serial_lora_rank=rank, **overrides)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [n for n, _ in model.named_modules()]
    trainable_before = _trainable_names(model)
    with pytest.raises(SerialLoraFileError, match=message) as raised:
        load_serial_lora(model, path)
    assert repr(file_arch) in str(raised.value) and repr(arch) in str(raised.value)
    assert [n for n, _ in model.named_modules()] == modules_before
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert _trainable_names(model) == trainable_before

    explicit = dict(serial_lora_rank=rank) if case == "rank" else {}
    error = ValueError if case == "rank" else SerialLoraFileError
    with pytest.raises(error, match=f"contradicts|{message}") as raised:
        timm.create_model(f"{arch}.{TAG}", serial_lora_weights=str(path), **explicit, **overrides)
    if error is SerialLoraFileError:
        assert repr(file_arch) in str(raised.value) and repr(arch) in str(raised.value)


def test_parallel_block_architecture_is_refused_by_the_factory():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_xp_224", depth=1)
    with pytest.raises(SerialLoraError, match="ParallelScalingBlock"):
        timm_plugin.make_serial_lora(model, "vit_base_patch16_xp_224", timm_plugin.SerialLoraOptions())
    assert not list(serial_lora_modules(model))


def test_gated_functional_qkv_attention_is_refused():
    """EVA attention with q/v biases and a gate: F.linear reads x for qkv, and the gate reads x too."""
    from timm.models.eva import EvaAttention

    class Block(nn.Module):
        def __init__(self, gated: bool) -> None:
            super().__init__()
            self.attn = EvaAttention(16, num_heads=2, qkv_fused=True, qkv_bias=True, scale_norm=False, gated=gated)

    class Model(nn.Module):
        def __init__(self, gated: bool) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([Block(gated)])

    assert timm_plugin.computes_qkv_functionally(Model(True).blocks[0].attn)
    assert timm_plugin.unsupported_attention(Model(False)) == []
    problems = timm_plugin.unsupported_attention(Model(True))
    assert problems and "gate" in problems[0]
    with pytest.raises(SerialLoraError, match="gate"):
        timm_plugin.make_serial_lora(Model(True), "hand_made", timm_plugin.SerialLoraOptions())
