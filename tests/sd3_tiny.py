"""A tiny Stable Diffusion 3 pipeline built in code with random weights (offline, ~0.1 s for 2 steps).

Used by the diffusers, ComfyUI and benchmark tests (`from sd3_tiny import ...`: pytest puts tests/ on
sys.path for its test files). Tokenizers are built in memory; nothing is downloaded.

    tiny_sd3_transformer(seed=0, **overrides)          2 joint blocks, 32 wide (4 heads of 8)
    tiny_sd3_transformer(dual_attention_layers=(0,))   the same with SD3.5's `attn2` in block 0
    tiny_sd3_comfy_compatible_transformer(seed=0)      hidden size 64 x depth, as ComfyUI requires
    tiny_sd3_pipeline(seed=0, dual_attention=False)    a whole StableDiffusion3Pipeline around the first
    generate(pipe, seed=0)                             32x32 images, 2 steps, deterministic
    transformer_inputs(transformer)                    random inputs for one transformer call
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

PROMPT = "a tiny red cat"
TINY_CONFIG = dict(sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                   num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                   pooled_projection_dim=64, out_channels=4)
# ComfyUI infers an SD3 model's depth from its weights and needs hidden size = 64 x depth.
COMFY_COMPATIBLE_CONFIG = dict(TINY_CONFIG, num_layers=2, attention_head_dim=64, num_attention_heads=2,
                               in_channels=16, out_channels=16, pos_embed_max_size=32, caption_projection_dim=128)
GENERATE = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=16, output_type="pt")


def tiny_sd3_transformer(seed: int = 0, **overrides) -> SD3Transformer2DModel:
    """A 2-block SD3 transformer (32 wide, 4 heads of 8); `dual_attention_layers=(0,)` gives SD3.5's attn2."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**{**TINY_CONFIG, **overrides}).eval()


def tiny_sd3_comfy_compatible_transformer(seed: int = 0, **overrides) -> SD3Transformer2DModel:
    """A 2-block SD3 transformer that ComfyUI's MMDiT loader accepts (128 wide = 64 x depth, 16 latent
    channels, pos_embed_max_size=32); its joint_attention_dim (32) and pooled_projection_dim (64) match
    the tiny text encoders of `tiny_sd3_pipeline`."""
    return tiny_sd3_transformer(seed, **{**COMFY_COMPATIBLE_CONFIG, **overrides})


def transformer_inputs(transformer: SD3Transformer2DModel, batch: int = 1, seed: int = 1) -> dict:
    """Random inputs of the right shapes for one transformer call."""
    cfg = transformer.config
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g),
        encoder_hidden_states=torch.randn(batch, 7, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([500.0] * batch),
    )


def _clip_tokenizer() -> CLIPTokenizer:
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer() -> T5Tokenizer:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz▁"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=16)


def _clip_text_encoder(seed: int, tokenizer: CLIPTokenizer) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=2, projection_dim=32, max_position_embeddings=77,
                            bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"), eos_token_id=eos,
                            pad_token_id=eos)
    return CLIPTextModelWithProjection(config).eval()


def tiny_sd3_pipeline(seed: int = 0, dual_attention: bool = False, **transformer_overrides) -> StableDiffusion3Pipeline:
    """The whole pipeline: tiny transformer, two tiny CLIP text encoders, a tiny T5, a one-level VAE.

    `dual_attention=True` gives block 0 SD3.5's second image attention (`attn2`); `transformer_overrides`
    go to `tiny_sd3_transformer` (an `in_channels` override also sizes the VAE's latents).
    """
    if dual_attention:
        transformer_overrides.setdefault("dual_attention_layers", (0,))
    transformer = tiny_sd3_transformer(seed, **transformer_overrides)
    latent_channels = transformer.config.in_channels
    clip_tokenizer, t5_tokenizer = _clip_tokenizer(), _t5_tokenizer()
    torch.manual_seed(seed + 3)
    t5 = T5EncoderModel(T5Config(vocab_size=t5_tokenizer.vocab_size, d_model=32, d_ff=37, d_kv=8, num_heads=4,
                                 num_layers=2)).eval()
    torch.manual_seed(seed + 4)
    vae = AutoencoderKL(block_out_channels=(4,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=latent_channels, norm_num_groups=1, sample_size=32,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=_clip_text_encoder(seed + 1, clip_tokenizer),
        tokenizer=clip_tokenizer,
        text_encoder_2=_clip_text_encoder(seed + 2, clip_tokenizer),
        tokenizer_2=clip_tokenizer,
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    )


def generate(pipe: StableDiffusion3Pipeline, seed: int = 0, **kwargs) -> torch.Tensor:
    """Images (B, 3, 32, 32) for the fixed prompt, deterministic for a seed."""
    options = {**GENERATE, **kwargs}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **options).images
