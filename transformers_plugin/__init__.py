"""Serial LoRA for Hugging Face transformers' CLIP and SAM, and open_clip: the paper's CLIP and SAM systems.

    from transformers import CLIPModel
    import transformers_plugin as tp

    model = CLIPModel.from_pretrained("openai/clip-vit-base-patch16")
    tp.inject(model, SerialLoraConfig(rank=32))          # every attention of the vision AND text towers
    ...                                                  # train
    tp.save_serial_lora(model, "clip.safetensors")       # the file records the towers
    tp.load_serial_lora(CLIPModel.from_pretrained(...), "clip.safetensors")

CLIP's attention reads one input per layer (one pair per layer, per tower). SAM (`SamModel`, timm
`samvit_*`): the image encoder only by default; `towers=("image_encoder", "mask_decoder")` also adapts
the mask decoder, one pair per attention input (query, key, value). open_clip models are supported
through their `nn.MultiheadAttention` (self-attention blocks). Importing this package registers the
hosts; it imports neither transformers nor open_clip.
"""

from .api import (
    FROZEN_BY_DEFAULT,
    TOWERS_KEY,
    adapted_towers,
    attention_towers,
    file_towers,
    from_pretrained,
    inject,
    load_serial_lora,
    prepare,
    save_serial_lora,
)
from .hosts import (
    OPEN_CLIP_MHA,
    SAM_MASK_DECODER,
    STREAMS_BY_INPUT,
    TOWER_CLASSES,
    PackedInputProjection,
    mark_streams_by_input,
    prepare_open_clip,
    register_transformers_hosts,
    tower_of,
)

register_transformers_hosts()

__all__ = [
    "FROZEN_BY_DEFAULT",
    "OPEN_CLIP_MHA",
    "PackedInputProjection",
    "SAM_MASK_DECODER",
    "STREAMS_BY_INPUT",
    "TOWERS_KEY",
    "TOWER_CLASSES",
    "adapted_towers",
    "attention_towers",
    "file_towers",
    "from_pretrained",
    "inject",
    "load_serial_lora",
    "mark_streams_by_input",
    "prepare",
    "prepare_open_clip",
    "register_transformers_hosts",
    "save_serial_lora",
    "tower_of",
]
