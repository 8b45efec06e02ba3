"""How Hugging Face transformers' CLIP and SAM (and open_clip) attention modules read their inputs.

Read from transformers 5.23 (`models/clip`, `models/sam`) and open_clip 3.3:

- `CLIPAttention` (both towers): `q_proj/k_proj/v_proj` all read `hidden_states`: the core's generic
  SPLIT_QKV host applies, one stream per layer. Nothing to add here.
- `SamVisionAttention` / `SamVisionSdpaAttention` (SAM image encoder): one fused `qkv` called on the
  channels-last windowed input: the core's FUSED_QKV applies (the adapter acts on the last dim, and is
  bias-free, so zero-padded window positions stay zero). timm's `samvit_*` likewise.
- `SamAttention` (SAM mask decoder) computes `q_proj(query)`, `k_proj(key)`, `v_proj(value)` from three
  different tensors (e.g. key = image + pe, value = image): three input streams, one pair each. The
  core never treats it as one stream (its forward takes `key`/`value`), and it is adapted only where
  asked for (`mark_streams_by_input`, which `inject(..., towers=("image_encoder", "mask_decoder"))`
  does): by default SAM's prompt encoder and mask decoder stay frozen and untouched.
- open_clip's `ResidualAttentionBlock.attn` is a `torch.nn.MultiheadAttention`: a packed
  `in_proj_weight` and no q/k/v modules, called as `attn(x, x, x)` for self-attention. The stream is
  the `query` argument (the core adapts every argument that is the same tensor, so key and value get
  the same adapted input); the packed weight is exposed to the core as an `nn.Linear` view for
  shapes and merging. Only self-attention blocks are marked (not CoCa's cross-attention blocks).
"""

from __future__ import annotations

from torch import nn

from serial_lora_core import AttentionHost, StreamSpec, register_host

STREAMS_BY_INPUT = "serial_lora_streams_by_input"
"""Attribute set to True on a multi-input attention module to adapt it with one pair per input."""

SAM_MASK_DECODER = AttentionHost(
    name="transformers_sam_mask_decoder",
    class_names=("SamAttention", "SamTwoWayTransformerAttention"),
    streams={
        "query": StreamSpec(projections=("q_proj",)),
        "key": StreamSpec(projections=("k_proj",)),
        "value": StreamSpec(projections=("v_proj",)),
    },
    condition=lambda module: getattr(module, STREAMS_BY_INPUT, False),
)
"""SAM's mask-decoder `SamAttention(query, key, value)`: three streams, one per input (opt-in)."""


class PackedInputProjection(nn.Linear):
    """A read/write view of `nn.MultiheadAttention`'s packed `in_proj_weight`/`in_proj_bias` as an `nn.Linear`.

    Never called (the attention computes `F.linear(x, in_proj_weight, in_proj_bias)` itself) and not
    registered as a child (it lives in the attention's `__dict__`), so the module tree, parameters and
    state-dict keys of the model stay exactly open_clip's. `weight` always resolves to the attention's
    current parameter, so `.to()`, `load_state_dict` and merging act on the real weight.
    """

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        nn.Module.__init__(self)
        self.__dict__["_attention"] = attention

    weight = property(lambda self: self._attention.in_proj_weight)
    bias = property(lambda self: self._attention.in_proj_bias)
    in_features = property(lambda self: self._attention.in_proj_weight.shape[1])
    out_features = property(lambda self: self._attention.in_proj_weight.shape[0])

    def forward(self, x):  # pragma: no cover - the attention never calls it
        return nn.functional.linear(x, self.weight, self.bias)


PACKED_VIEW = "in_proj"


def _marked_self_attention(module: nn.Module) -> bool:
    return getattr(module, STREAMS_BY_INPUT, False) and isinstance(module.__dict__.get(PACKED_VIEW), PackedInputProjection)


OPEN_CLIP_MHA = AttentionHost(
    name="open_clip_multihead_attention",
    class_names=("MultiheadAttention",),
    streams={"input": StreamSpec(projections=(PACKED_VIEW,), input_argument=("query", 0))},
    condition=_marked_self_attention,
)
"""open_clip's self-attention `nn.MultiheadAttention` (marked by `prepare_open_clip`)."""


def mark_streams_by_input(model: nn.Module, class_names: tuple[str, ...] = SAM_MASK_DECODER.class_names) -> list[str]:
    """Let the SAM_MASK_DECODER host adapt the multi-input attentions of `model` (one pair per input).

    Returns the names of the marked modules.
    """
    marked = []
    for name, module in model.named_modules():
        if type(module).__name__ in class_names:
            setattr(module, STREAMS_BY_INPUT, True)
            marked.append(name)
    return marked


def prepare_open_clip(model: nn.Module) -> list[str]:
    """Mark open_clip's self-attention `nn.MultiheadAttention` modules so the core can adapt them.

    A block is self-attention when it has no `ln_1_kv` (open_clip gives cross-attention blocks one),
    and its attention packs q, k, v of one width (`_qkv_same_embed_dim`). Idempotent; returns the
    names of the prepared attention modules.
    """
    prepared = []
    for name, block in model.named_modules():
        attention = getattr(block, "attn", None)
        if not isinstance(attention, nn.MultiheadAttention) or hasattr(block, "ln_1_kv"):
            continue
        if not attention._qkv_same_embed_dim or attention.in_proj_weight is None:
            continue
        setattr(attention, STREAMS_BY_INPUT, True)
        attention.__dict__[PACKED_VIEW] = PackedInputProjection(attention)
        prepared.append(f"{name}.attn" if name else "attn")
    return prepared


TOWER_CLASSES = {
    # transformers CLIP (v4 wrapped the towers in *Transformer classes, v5 in the *Model classes)
    "CLIPVisionTransformer": "vision",
    "CLIPVisionModel": "vision",
    "CLIPVisionModelWithProjection": "vision",
    "CLIPTextTransformer": "text",
    "CLIPTextModel": "text",
    "CLIPTextModelWithProjection": "text",
    # transformers SAM
    "SamVisionEncoder": "image_encoder",
    "SamVisionModel": "image_encoder",
    "SamPromptEncoder": "prompt_encoder",
    "SamMaskDecoder": "mask_decoder",
    # timm SAM image encoder
    "VisionTransformerSAM": "image_encoder",
    # open_clip
    "VisionTransformer": "vision",
    "TextTransformer": "text",
}
"""Class name of a tower's root module -> tower name (matched by class, not by path)."""

_ROOT_TOWER = {"CLIP": "text"}  # open_clip's CLIP keeps its text transformer at the root


def tower_of(model: nn.Module, attention: str) -> str:
    """The tower ("vision", "text", "image_encoder", "mask_decoder", ...) holding module `attention`."""
    module = model
    tower = TOWER_CLASSES.get(type(model).__name__, _ROOT_TOWER.get(type(model).__name__, "model"))
    for atom in attention.split(".") if attention else ():
        module = getattr(module, atom)
        tower = TOWER_CLASSES.get(type(module).__name__, tower)
    return tower


def register_transformers_hosts() -> None:
    """Make the core recognise the marked SAM mask-decoder and open_clip attentions."""
    register_host(SAM_MASK_DECODER)
    register_host(OPEN_CLIP_MHA)
