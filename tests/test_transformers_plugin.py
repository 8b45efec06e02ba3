"""transformers CLIP / SAM and open_clip integration: towers, parameter counts vs PEFT, the hand formula on each
tower, zero-init == base, saved adapters reloading, and bad inputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)

import serial_lora_core as core
import transformers_plugin as tp
from hf_tiny import (
    CLIP_IMAGE,
    LAYERS,
    SAM_IMAGE,
    TEXT_WIDTH,
    VISION_WIDTH,
    hand_adapted,
    randomize_adapters,
    save_tiny_clip_folder,
    tiny_clip,
    tiny_open_clip,
    tiny_sam,
)
from serial_lora_core import SerialLoraConfig, SerialLoraError, SerialLoraFileError
from serial_lora_core.formula import scaling

RANK, ALPHA = 4, 8.0
SCALING = scaling(ALPHA, RANK)
CLIP_CLASSES = [
    (CLIPModel, {"text": TEXT_WIDTH, "vision": VISION_WIDTH}),
    (CLIPVisionModel, {"vision": VISION_WIDTH}),
    (CLIPVisionModelWithProjection, {"vision": VISION_WIDTH}),
    (CLIPTextModel, {"text": TEXT_WIDTH}),
    (CLIPTextModelWithProjection, {"text": TEXT_WIDTH}),
]


def _tokens(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(0))


def _pixels(size: int = CLIP_IMAGE, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _clip_outputs(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.get_image_features(pixel_values=_pixels()).pooler_output, \
            model.get_text_features(input_ids=_tokens()).pooler_output


def _peft_lora_count(model: nn.Module) -> int:
    lora = get_peft_model(model, LoraConfig(r=RANK, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    return sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("cls, widths", CLIP_CLASSES, ids=[c.__name__ for c, _ in CLIP_CLASSES])
def test_every_clip_class_gets_a_pair_per_layer_in_each_tower_and_a_quarter_of_peft_lora(cls, widths):
    model = tiny_clip(cls)
    wrapped = tp.inject(model, SerialLoraConfig(rank=RANK))
    assert {tower: len(names) for tower, names in tp.attention_towers(model).items()} == dict.fromkeys(widths, LAYERS)
    assert tp.adapted_towers(model) == sorted(widths)
    assert all(list(w.stream_specs) == ["input"] for w in wrapped.values())
    serial = core.count_trainable_parameters(model)
    assert serial == sum(LAYERS * 2 * RANK * width for width in widths.values())
    assert 4 * serial == _peft_lora_count(tiny_clip(cls))


@pytest.mark.parametrize("towers", [("vision",), ("text",), ("vision", "text")])
def test_towers_select_what_is_adapted(towers):
    model = tiny_clip()
    wrapped = tp.inject(model, SerialLoraConfig(rank=RANK), towers=towers)
    assert tp.adapted_towers(model) == sorted(towers)
    assert sorted(wrapped) == sorted(n for t in towers for n in tp.attention_towers(model)[t])


def test_clip_vit_b16_both_towers_at_rank_32_is_983040_parameters_a_quarter_of_peft_lora():
    config = CLIPConfig(vision_config=dict(patch_size=16, image_size=224))  # ViT-B/16: vision 768 x 12, text 512 x 12
    assert (config.vision_config.hidden_size, config.text_config.hidden_size) == (768, 512)
    with torch.device("meta"):  # real dimensions, no memory
        serial_model, lora_model = CLIPModel(config), CLIPModel(config)
    tp.inject(serial_model, SerialLoraConfig(rank=32))
    serial = core.count_trainable_parameters(serial_model)
    assert serial == 12 * 2 * 768 * 32 + 12 * 2 * 512 * 32 == 983_040
    lora = get_peft_model(lora_model, LoraConfig(r=32, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    assert sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n) == 4 * serial == 3_932_160


def test_zero_initialised_adapters_leave_clip_outputs_bit_identical():
    model = tiny_clip()
    before = _clip_outputs(model)
    tp.inject(model, SerialLoraConfig(rank=RANK))
    after = _clip_outputs(model)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("tower, width", [("text", TEXT_WIDTH), ("vision", VISION_WIDTH)])
def test_hand_formula_on_each_clip_tower(tower, width):
    model = tiny_clip()
    base = copy.deepcopy(model)
    wrapped = tp.inject(model, SerialLoraConfig(rank=RANK, alpha=ALPHA))
    randomize_adapters(model)
    hidden = torch.randn(2, 5, width, generator=torch.Generator().manual_seed(1))
    for name in tp.attention_towers(model)[tower]:
        adapter = wrapped[name]["default"]["input"]
        assert adapter.features == width
        with torch.no_grad():
            got = model.get_submodule(name)(hidden)[0]
            expected = base.get_submodule(name)(hand_adapted(hidden, adapter, SCALING))[0]
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("factory, tower", [(tiny_sam, "image_encoder"), ("samvit", "image_encoder")])
def test_sam_image_encoders_are_adapted_by_default_with_the_hand_formula_on_windowed_input(factory, tower):
    if factory == "samvit":
        import timm

        torch.manual_seed(0)
        model = timm.create_model("samvit_base_patch16", img_size=SAM_IMAGE, patch_size=16, embed_dim=32, depth=2,
                                  num_heads=2, global_attn_indexes=(1,), window_size=2, neck_chans=16).eval()
    else:
        model = factory()
    base = copy.deepcopy(model)
    wrapped = tp.inject(model, SerialLoraConfig(rank=RANK, alpha=ALPHA))
    assert tp.adapted_towers(model) == [tower]
    randomize_adapters(model)
    name = next(iter(wrapped))
    adapter = wrapped[name]["default"]["input"]
    windows = torch.randn(3, 2, 2, adapter.features, generator=torch.Generator().manual_seed(2))  # channels-last
    windows[0] = 0  # a zero-padded window stays zero through the bias-free adapter
    torch.testing.assert_close(hand_adapted(windows, adapter, SCALING)[0], windows[0])
    with torch.no_grad():
        got, expected = (m.get_submodule(name)(w) for m, w in ((model, windows),
                                                               (base, hand_adapted(windows, adapter, SCALING))))
    got, expected = (o[0] if isinstance(o, tuple) else o for o in (got, expected))
    torch.testing.assert_close(got, expected)


def test_open_clip_self_attention_is_adapted_through_its_packed_multihead_attention():
    model = tiny_open_clip()
    keys = sorted(model.state_dict())
    base = copy.deepcopy(model)
    wrapped = tp.inject(model, SerialLoraConfig(rank=RANK, alpha=ALPHA))
    assert {t: len(n) for t, n in tp.attention_towers(model).items()} == {"text": LAYERS, "vision": LAYERS}
    assert sorted(k for k in model.state_dict() if ".serial_lora." not in k) == keys  # open_clip's keys unchanged
    randomize_adapters(model)
    name = tp.attention_towers(model)["vision"][0]
    adapter = wrapped[name]["default"]["input"]
    x = torch.randn(2, 5, adapter.features, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = model.get_submodule(name)(x, x, x, need_weights=False)[0]
        tx = hand_adapted(x, adapter, SCALING)
        expected = base.get_submodule(name)(tx, tx, tx, need_weights=False)[0]
        torch.testing.assert_close(got, expected)
        images, text = _pixels(), torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
        unmerged = model.encode_image(images), model.encode_text(text)
        core.merge_serial_lora(model)  # merging edits the packed in_proj_weight itself
        merged = model.encode_image(images), model.encode_text(text)
        core.unmerge_serial_lora(model)
    for a, b in zip(unmerged, merged):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(unmerged[0], base.encode_image(images))


def test_open_clip_cross_attention_blocks_are_not_prepared():
    from open_clip.transformer import ResidualAttentionBlock

    holder = nn.Module()
    holder.self_block = ResidualAttentionBlock(16, 2)
    holder.cross_block = ResidualAttentionBlock(16, 2, is_cross_attention=True)
    assert tp.prepare_open_clip(holder) == ["self_block.attn"]


@pytest.mark.parametrize("kind", ["clip", "sam_with_decoder", "open_clip"])
def test_saved_adapters_record_their_towers_and_reload_into_a_fresh_model_with_the_same_outputs(kind, tmp_path):
    build, towers, run = {
        "clip": (tiny_clip, None, _clip_outputs),
        "sam_with_decoder": (tiny_sam, ("image_encoder", "mask_decoder"), _sam_outputs),
        "open_clip": (tiny_open_clip, None, _open_clip_outputs),
    }[kind]
    model = build()
    tp.inject(model, SerialLoraConfig(rank=RANK, alpha=ALPHA), towers=towers)
    randomize_adapters(model)
    path = tp.save_serial_lora(model, tmp_path / "adapter.safetensors")
    assert tp.file_towers(path) == tp.adapted_towers(model) == sorted(towers or tp.attention_towers(model))
    fresh = build()
    assert not all(torch.equal(a, b) for a, b in zip(run(model), run(fresh)))
    tp.load_serial_lora(fresh, path)
    # Both wholly frozen: torch picks fused kernels by requires_grad (nn.MultiheadAttention's fast path, SDPA's
    # backends), and different kernels round differently.
    model.requires_grad_(False)
    fresh.requires_grad_(False)
    for a, b in zip(run(model), run(fresh)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _sam_outputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    boxes = torch.tensor([[[4.0, 6.0, 40.0, 50.0]], [[10.0, 2.0, 60.0, 30.0]]])
    with torch.no_grad():
        out = model(pixel_values=_pixels(SAM_IMAGE), input_boxes=boxes, multimask_output=False)
    return out.pred_masks, out.iou_scores


def _open_clip_outputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model.encode_image(_pixels()), model.encode_text(torch.arange(16).reshape(2, 8) % 50)


def test_core_load_and_from_pretrained_are_one_liners_for_transformers_users(tmp_path):
    model = tiny_clip()
    tp.inject(model, SerialLoraConfig(rank=RANK))
    randomize_adapters(model)
    path = tp.save_serial_lora(model, tmp_path / "clip.safetensors")
    folder = save_tiny_clip_folder(tmp_path / "base")
    via_core = CLIPModel.from_pretrained(folder).eval()
    core.load_serial_lora(via_core, path)
    via_plugin = tp.from_pretrained(folder, path, CLIPModel).eval()
    for a, b, c in zip(_clip_outputs(model), _clip_outputs(via_core), _clip_outputs(via_plugin)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_bad_inputs_get_clear_errors_and_change_nothing(tmp_path):
    sam = tiny_sam()
    with pytest.raises(ValueError, match=r"towers=\['audio'\]: SamModel has attention in towers \['image_encoder'\]"):
        tp.inject(sam, towers=("audio",))
    with pytest.raises(ValueError, match="selects no attention"):
        tp.inject(sam, SerialLoraConfig(target_modules="nothing_like_this"))
    assert not list(core.serial_lora_modules(sam))
    clip = tiny_clip()
    tp.inject(clip, SerialLoraConfig(rank=RANK))
    randomize_adapters(clip)
    bad = core.save_serial_lora(clip, tmp_path / "bad.safetensors", metadata={tp.TOWERS_KEY: "vision"})
    with pytest.raises(SerialLoraFileError, match="'towers' must be a JSON list of tower names, got 'vision'"):
        tp.load_serial_lora(tiny_clip(), bad)
    good = tp.save_serial_lora(clip, tmp_path / "clip.safetensors")
    assert json.loads(core.read_file(good).metadata[tp.TOWERS_KEY]) == ["text", "vision"]
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    with pytest.raises(SerialLoraFileError, match="the model was not changed"):
        tp.load_serial_lora(sam, good)
    assert not list(core.serial_lora_modules(sam))
    assert all(torch.equal(before[k], v) for k, v in sam.state_dict().items())
    with pytest.raises(SerialLoraError, match="does not exist"):
        tp.from_pretrained(tmp_path, tmp_path / "missing.safetensors", CLIPModel)
    with pytest.raises(TypeError, match="config must be a SerialLoraConfig"):
        tp.inject(tiny_clip(), {"rank": 4})


def test_benchmark_smoke_mode_runs_both_sections_on_cpu(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "clip_sam.py"
    done = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "clip_sam.json").read_text())
    for section, serial in (("clip", 2 * 4 * 2 * (32 + 48)), ("sam", 2 * 4 * 2 * 32)):
        assert results[section]["trainable_parameters"]["serial"] == serial
        assert set(results[section]["ratios"]) >= {"serial_over_floor", "serial_overhead_over_peft_overhead"}
        assert all(results[section][m]["median_ms"] > 0 for m in ("floor", "floor_blocks", "serial", "peft"))
