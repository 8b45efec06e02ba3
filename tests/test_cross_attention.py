"""Attention with more than one input: one Serial LoRA pair per input stream, never one pair for different inputs.

A tiny cross-attention model built in code (q from x, k and v from a context) and SAM's mask-decoder
`SamAttention(query, key, value)`: the generic hosts refuse both; an explicit host adapts each input
separately, and the result equals the hand formula (the base module fed each input's (I + s·B A) x).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import transformers_plugin as tp
from hf_tiny import hand_adapted, randomize_adapters, tiny_sam
from serial_lora_core import (
    AttentionHost,
    SerialLoraConfig,
    SerialLoraError,
    StreamSpec,
    SPLIT_QKV,
    inject_serial_lora,
    merge_serial_lora,
    serial_lora_modules,
    unmerge_serial_lora,
)
from serial_lora_core.formula import scaling
from serial_lora_core.hosts import reads_separate_inputs, registered

DIM, CONTEXT_DIM, RANK, ALPHA = 8, 6, 2, 4.0
SCALING = scaling(ALPHA, RANK)


class TinySelfAttention(nn.Module):
    """q, k, v all read x."""

    def __init__(self, dim: int = DIM, kv_dim: int = DIM) -> None:
        super().__init__()
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(kv_dim, dim)
        self.v_proj = nn.Linear(kv_dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        heads = lambda t: t.unflatten(-1, (2, -1)).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x))


class TinyCrossAttention(TinySelfAttention):
    """q reads x; k and v read the context (another tensor, another width)."""

    def __init__(self) -> None:
        super().__init__(DIM, CONTEXT_DIM)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.attend(self.q_proj(x), self.k_proj(context), self.v_proj(context))


class FlaggedCrossAttention(TinySelfAttention):
    """Reads one argument but says it is cross-attention (as diffusers' `Attention.is_cross_attention`)."""

    is_cross_attention = True


class TinyDecoderBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = TinySelfAttention()
        self.cross_attn = TinyCrossAttention()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(x)
        return x + self.cross_attn(x, context)


CROSS_HOST = AttentionHost(
    name="test_tiny_cross",
    class_names=("TinyCrossAttention",),
    streams={"query": StreamSpec(projections=("q_proj",)), "context": StreamSpec(projections=("k_proj", "v_proj"))},
)


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, DIM, generator=generator), torch.randn(2, 7, CONTEXT_DIM, generator=generator)


@pytest.mark.parametrize("module, separate", [
    (TinySelfAttention(), False),
    (TinyCrossAttention(), True),
    (FlaggedCrossAttention(), True),
    (tiny_sam().mask_decoder.transformer.layers[0].cross_attn_token_to_image, True),
])
def test_generic_split_host_refuses_modules_whose_projections_may_read_different_inputs(module, separate):
    assert reads_separate_inputs(module) is separate
    assert bool(SPLIT_QKV.streams_of(module)) is (not separate)


def test_default_injection_adapts_self_attention_and_leaves_cross_attention_untouched():
    torch.manual_seed(0)
    block = TinyDecoderBlock()
    wrapped = inject_serial_lora(block, SerialLoraConfig(rank=RANK))
    assert list(wrapped) == ["self_attn"]
    assert not hasattr(block.cross_attn, "serial_lora")
    assert not any(p.requires_grad for p in block.cross_attn.parameters())


def test_only_a_cross_attention_model_is_refused_with_a_clear_error():
    with pytest.raises(SerialLoraError, match="no attention module of TinyCrossAttention matched"):
        inject_serial_lora(TinyCrossAttention(), SerialLoraConfig(rank=RANK))


def test_cross_attention_streams_are_adapted_separately_and_equal_the_hand_formula():
    torch.manual_seed(0)
    block = TinyDecoderBlock()
    base = copy.deepcopy(block)
    x, context = _inputs()
    with registered(CROSS_HOST):
        wrapped = inject_serial_lora(block, SerialLoraConfig(rank=RANK, alpha=ALPHA))
    assert sorted(wrapped["cross_attn"].stream_specs) == ["context", "query"]
    randomize_adapters(block)
    cross = wrapped["cross_attn"]["default"]
    # One pair per input: the query pair is DIM wide, the context pair CONTEXT_DIM wide.
    assert (cross["query"].features, cross["context"].features) == (DIM, CONTEXT_DIM)
    assert sum(p.numel() for p in cross.parameters()) == 2 * RANK * (DIM + CONTEXT_DIM)

    with torch.no_grad():
        hidden = base.self_attn(hand_adapted(x, wrapped["self_attn"]["default"]["input"], SCALING)) + x
        expected = hidden + base.cross_attn(hand_adapted(hidden, cross["query"], SCALING),
                                            hand_adapted(context, cross["context"], SCALING))
        torch.testing.assert_close(block(x, context), expected)
        # Merging folds each stream into its own projections: same outputs.
        merge_serial_lora(block)
        torch.testing.assert_close(block(x, context), expected, rtol=1e-5, atol=1e-5)
        unmerge_serial_lora(block)
        torch.testing.assert_close(block(x, context), expected)


@pytest.mark.parametrize("stream, changed", [("query", "q"), ("context", "kv")])
def test_each_cross_attention_stream_reaches_only_its_own_projections(stream, changed):
    module = TinyCrossAttention()
    seen = {}
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(module, name).register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0]))
    x, context = _inputs()
    with registered(CROSS_HOST):
        inject_serial_lora(module, SerialLoraConfig(rank=RANK, alpha=ALPHA, streams=(stream,)))
    randomize_adapters(module)
    with torch.no_grad():
        module(x, context)
    adapter = module.serial_lora["default"][stream]
    expect_q = hand_adapted(x, adapter, SCALING) if changed == "q" else x
    expect_kv = hand_adapted(context, adapter, SCALING) if changed == "kv" else context
    torch.testing.assert_close(seen["q_proj"], expect_q)
    torch.testing.assert_close(seen["k_proj"], expect_kv)
    torch.testing.assert_close(seen["v_proj"], expect_kv)


def test_default_sam_injection_adapts_the_image_encoder_only():
    model = tiny_sam()
    wrapped = inject_serial_lora(model, SerialLoraConfig(rank=RANK))
    assert wrapped and all(name.startswith("vision_encoder.") for name in wrapped)
    for part in (model.mask_decoder, model.prompt_encoder):
        assert not any(isinstance(m, nn.Module) and hasattr(m, "serial_lora") for m in part.modules())
        assert not any(p.requires_grad for p in part.parameters())


def test_sam_mask_decoder_attention_gets_one_pair_per_input_and_equals_the_hand_formula():
    model = tiny_sam()
    base = copy.deepcopy(model)
    wrapped = tp.inject(model, SerialLoraConfig(rank=RANK, alpha=ALPHA), towers=("image_encoder", "mask_decoder"))
    randomize_adapters(model)
    name = "mask_decoder.transformer.layers.0.cross_attn_token_to_image"
    adapters = wrapped[name]["default"]
    assert sorted(adapters) == ["key", "query", "value"]
    generator = torch.Generator().manual_seed(3)
    query, key, value = (torch.randn(1, 1, n, 16, generator=generator) for n in (4, 9, 9))
    with torch.no_grad():
        got = model.get_submodule(name)(query, key, value)[0]
        expected = base.get_submodule(name)(*(hand_adapted(t, adapters[s], SCALING)
                                              for t, s in ((query, "query"), (key, "key"), (value, "value"))))[0]
    torch.testing.assert_close(got, expected)
    decoder_modules = [n for n, _ in serial_lora_modules(model) if n.startswith("mask_decoder.")]
    assert len(decoder_modules) == 2 * 3 + 1  # two two-way blocks of three attentions, plus the final one
