"""What the timm plugin tells a new user who gets it wrong: a tag on an architecture without one, and a
trained adapter put on base weights that were never loaded."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import _builder

import timm_plugin
from serial_lora_core import save_serial_lora
from timm_models import BY_NAME

MISSING_TAG = [
    # (architecture, what the message must say about it)
    ("resnet18", "has no attention layers for Serial LoRA to adapt"),
    ("swin_tiny_patch4_window7_224", "its attention (WindowAttention) is not among those Serial LoRA is registered"),
    ("vit_base_patch16_xp_224", "q, k and v in one Linear together with the MLP"),
]


@pytest.mark.parametrize(("architecture", "why"), MISSING_TAG, ids=[a for a, _ in MISSING_TAG])
def test_tag_on_an_architecture_without_it_says_why_and_where_it_exists(architecture, why):
    with pytest.raises(ValueError) as error:
        timm.create_model(f"{architecture}.serial_lora")
    message = str(error.value)
    assert f"'{architecture}'" in message and why in message
    for family in timm_plugin.FAMILIES:  # where the tag does exist, and how to list it
        assert family in message
    assert "timm.list_models('*.serial_lora', include_tags=True)" in message


def test_other_tags_still_resolve_through_the_wrapped_lookup():
    """The hook only answers for the `.serial_lora` tag: timm's own tags and errors are unchanged."""
    with torch.device("meta"):
        assert timm.create_model("resnet18.a1_in1k").pretrained_cfg["tag"] == "a1_in1k"
    with pytest.raises(RuntimeError, match="Invalid pretrained tag"):
        timm.create_model("resnet18.no_such_tag")


def test_registration_wraps_the_lookup_once():
    before = _builder.get_pretrained_cfg
    timm_plugin.register_serial_lora_models()
    assert _builder.get_pretrained_cfg is before


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base weights file, adapter file) of the tiny CLIP ViT, the adapter trained-looking (non-zero)."""
    family, folder = BY_NAME["clip_vit"], tmp_path_factory.mktemp("trained")
    base = folder / "base.safetensors"
    save_file(family.create(tag=False, seed=1).state_dict(), str(base))
    model = family.create(pretrained=True, pretrained_cfg_overlay=dict(file=str(base)))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return base, save_serial_lora(model, folder / "adapter.safetensors")


@pytest.mark.parametrize("pretrained", [False, True])
def test_adapter_on_base_weights_never_loaded_warns(trained, pretrained):
    base, adapter = trained
    family = BY_NAME["clip_vit"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        family.create(pretrained=pretrained, pretrained_cfg_overlay=dict(file=str(base)),
                      serial_lora_weights=str(adapter))
    ours = [w for w in caught if "random base weights" in str(w.message)]
    if not pretrained:
        assert len(ours) == 1 and ours[0].category is UserWarning
        assert "pretrained=True" in str(ours[0].message) and str(adapter) in str(ours[0].message)
        # Attributed to the line that called timm.create_model, not to timm or the plugin.
        assert ours[0].filename.endswith("timm_models.py")
    else:
        assert ours == []


def test_warning_on_random_base_is_not_raised_for_a_new_adapter():
    """Training a new adapter from scratch on pretrained=False is legitimate (tests, tiny models)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BY_NAME["clip_vit"].create(pretrained=False)
