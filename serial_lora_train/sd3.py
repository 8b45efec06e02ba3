"""`serial-lora train-sd3`: DreamBooth / style fine-tuning of an SD3 / SD3.5 transformer.

The training math is that of diffusers' `examples/dreambooth/train_dreambooth_lora_sd3.py`, through
diffusers' own functions (nothing re-derived here):

- text: `StableDiffusion3Pipeline.encode_prompt` (CLIP-L and CLIP-G penultimate hidden states
  concatenated, zero-padded to T5's width, followed by T5's tokens; pooled = both CLIP pooled
  outputs), computed once per distinct caption; the text encoders are then freed;
- images: the pipeline's `VaeImageProcessor` (resize + centre crop, [-1, 1]), the VAE's latent
  distribution computed once, a latent sampled from it at every step, then
  `(z - shift_factor) * scaling_factor`;
- timesteps: `compute_density_for_timestep_sampling` (logit-normal by default) indexes the
  scheduler's shifted schedule, `x_t = (1 - sigma) x_0 + sigma noise`, loss weighting
  `compute_loss_weighting_for_sd3`; target `noise - x_0`, or with `--precondition-outputs 1`
  (diffusers' default) the prediction is mapped to `x_0` (`pred * -sigma + x_t`) and the target is `x_0`.

    serial-lora train-sd3 --pretrained-model-name-or-path stabilityai/stable-diffusion-3-medium-diffusers \\
        --instance-data-dir dog/ --instance-prompt "a photo of sks dog" --output-dir out/ \\
        --rank 16 --learning-rate 4e-4 --max-train-steps 500 --validation-prompt "sks dog in a bucket"

Writes `serial_lora_weights.safetensors` (what `pipe.load_serial_lora_weights` and the ComfyUI node
load), a model card, and with `--export-lora` the exact standard LoRA `pytorch_lora_weights.safetensors`
(stock `pipe.load_lora_weights`). `--method lora` trains PEFT's LoRA on the same attention blocks instead.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from serial_lora_core import SerialLoraError
from serial_lora_core.format import atomic_write

from .engine import Task, TaskSetup
from .entry import task_main, task_parser

CAPTION_SUFFIX = ".txt"
WEIGHTING_SCHEMES = ("logit_normal", "sigma_sqrt", "mode", "cosmap")
STREAMS = ("image", "text")
FIXED_NOISE_EXAMPLES = 8
"""Training images the fixed-noise loss (`val_loss`) is measured on."""


# ----------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Example:
    """One training image and its caption."""

    image: Path
    caption: str


def _image_suffixes() -> set[str]:
    from PIL import Image

    return {suffix.lower() for suffix in Image.registered_extensions()}


def scan_instance_folder(folder: str | Path, instance_prompt: str | None = None) -> list[Example]:
    """The images of `folder` with their captions: `<stem>.txt` next to an image, else `instance_prompt`.

    Raises a `SerialLoraError` naming the folder (missing, empty), the caption files without an image,
    and the images without a caption when no `instance_prompt` is given. Images are not opened here.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SerialLoraError(f"--instance-data-dir {str(folder)!r} is not a folder; pass the folder of the "
                              "training images")
    suffixes = _image_suffixes()
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in suffixes]
    captions = {p.stem: p for p in files if p.suffix.lower() == CAPTION_SUFFIX}
    orphans = sorted(name for stem, name in captions.items() if stem not in {p.stem for p in images})
    if orphans:
        listed = ", ".join(p.name for p in orphans)
        raise SerialLoraError(f"--instance-data-dir {str(folder)!r}: caption file(s) without an image: {listed}; "
                              "add the image (same name, an image suffix) or remove the caption")
    if not images:
        raise SerialLoraError(f"--instance-data-dir {str(folder)!r} holds no image file (.png, .jpg, .webp or any "
                              "format PIL reads); put the training images there")
    missing = [p.name for p in images if p.stem not in captions]
    if missing and not instance_prompt:
        raise SerialLoraError(f"--instance-data-dir {str(folder)!r}: {len(missing)} image(s) have no caption file "
                              f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); add <name>.txt "
                              "next to each image or pass --instance-prompt")
    examples = []
    for image in images:
        text = captions[image.stem].read_text(encoding="utf-8").strip() if image.stem in captions else ""
        if not (text or instance_prompt):
            raise SerialLoraError(f"caption file {str(captions[image.stem])!r} is empty; write the caption or pass "
                                  "--instance-prompt")
        examples.append(Example(image, text or instance_prompt))
    return examples


# ------------------------------------------------------------------------------- precomputed inputs


@torch.no_grad()
def encode_captions(pipe, captions: list[str], max_sequence_length: int, batch_size: int = 8
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{caption: (prompt_embeds (T, D), pooled (P,))} through the pipeline's own `encode_prompt`, on CPU.

    That is diffusers' three-encoder embedding: CLIP-L and CLIP-G penultimate hidden states
    concatenated and zero-padded to T5's width, then T5's tokens; pooled = both CLIP pooled outputs.
    """
    distinct = list(dict.fromkeys(captions))
    out = {}
    for start in range(0, len(distinct), batch_size):
        chunk = distinct[start:start + batch_size]
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=chunk, prompt_2=None, prompt_3=None,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)
        for i, caption in enumerate(chunk):
            out[caption] = (embeds[i].float().cpu(), pooled[i].float().cpu())
    return out


def free_text_encoders(pipe) -> None:
    """Drop the three text encoders (the embeddings are precomputed) and give their memory back."""
    from diffusers.training_utils import free_memory

    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            setattr(pipe, name, None)
    free_memory()


@torch.no_grad()
def encode_latent_distributions(pipe, images: list[Path], resolution: int, batch_size: int = 4) -> torch.Tensor:
    """The VAE's latent distribution parameters (N, 2C, h, w), on CPU, of image files resized and
    centre-cropped to `resolution` by the pipeline's image processor (diffusers keeps the VAE in float32)."""
    vae = pipe.vae
    params = []
    for start in range(0, len(images), batch_size):
        batch = [_read_rgb(path) for path in images[start:start + batch_size]]
        pixels = pipe.image_processor.preprocess(batch, height=resolution, width=resolution, resize_mode="crop")
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        params.append(dist.parameters.float().cpu())
    return torch.cat(params)


def _read_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")  # convert() decodes the whole file: a truncated one fails here


def sample_latents(distribution_params: torch.Tensor, shift_factor: float | None, scaling_factor: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """x_0: a latent drawn from the cached VAE distribution, then `(z - shift_factor) * scaling_factor`."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    z = DiagonalGaussianDistribution(distribution_params).sample(generator=generator)
    return (z - (shift_factor or 0.0)) * scaling_factor


# ------------------------------------------------------------------------------------ flow matching


@dataclass(frozen=True)
class FlowMatching:
    """The timestep sampling and loss options of diffusers' SD3 DreamBooth script (same names, same defaults)."""

    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = True

    def __post_init__(self) -> None:
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise SerialLoraError(f"--weighting-scheme {self.weighting_scheme!r} is not one of {WEIGHTING_SCHEMES}")

    def noisy_inputs(self, latents: torch.Tensor, noise: torch.Tensor, scheduler,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, timesteps, sigmas): u from `compute_density_for_timestep_sampling` picks entries of the
        scheduler's (shifted) training schedule; x_t = (1 - sigma) x_0 + sigma noise. `sigmas` has
        latents' number of dimensions."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(self.weighting_scheme, latents.shape[0], self.logit_mean,
                                                  self.logit_std, self.mode_scale, generator=generator)
        # As diffusers' script; the clamp only guards u == 1.0 exactly (a float32 sigmoid can round to it).
        indices = (u * scheduler.config.num_train_timesteps).long().clamp(0, len(scheduler.timesteps) - 1)
        timesteps = scheduler.timesteps[indices].to(latents.device)
        sigmas = scheduler.sigmas[indices].to(latents.device, latents.dtype)
        sigmas = sigmas.reshape(-1, *([1] * (latents.ndim - 1)))
        return (1.0 - sigmas) * latents + sigmas * noise, timesteps, sigmas

    def loss(self, model_pred: torch.Tensor, noisy: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
             sigmas: torch.Tensor) -> torch.Tensor:
        """The weighted flow-matching loss (mean over pixels, then over the batch), in float32."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        model_pred = model_pred.float()
        if self.precondition_outputs:
            model_pred = model_pred * (-sigmas) + noisy
            target = latents
        else:
            target = noise - latents
        weighting = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas)
        per_sample = (weighting.float() * (model_pred - target.float()) ** 2).reshape(latents.shape[0], -1)
        return per_sample.mean(1).mean()


# ------------------------------------------------------------------------------------------ the task


def check_images(examples: list[Example], skip_bad_images: bool = False) -> tuple[list[Example], list[str]]:
    """(readable examples, skipped "file (why)" strings): every image is decoded once before training;
    the unreadable ones are all listed in one error, or skipped with `skip_bad_images`."""
    kept, bad = [], []
    for example in examples:
        try:
            _read_rgb(example.image)
            kept.append(example)
        except Exception as err:  # noqa: BLE001  (PIL raises many types for bad files)
            bad.append(f"{example.image.name} ({type(err).__name__}: {err})")
    folder = str(examples[0].image.parent)
    if bad and not skip_bad_images:
        raise SerialLoraError(f"--instance-data-dir {folder!r}: {len(bad)} unreadable image(s): {'; '.join(bad[:10])}"
                              f"{' and more' if len(bad) > 10 else ''}. Fix or remove them, or pass --skip-bad-images "
                              "to skip them")
    if not kept:
        raise SerialLoraError(f"--instance-data-dir {folder!r}: every image is unreadable ({'; '.join(bad[:3])})")
    return kept, bad


class PrecomputedSD3Dataset(torch.utils.data.Dataset):
    """Cached VAE distributions and text embeddings; each item draws its latent x_0 from its distribution
    (diffusers' `--cache_latents`), with the RNG the engine seeds per (seed, epoch, index)."""

    def __init__(self, latent_params: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor,
                 shift_factor: float | None, scaling_factor: float) -> None:
        if not len(latent_params) == len(prompt_embeds) == len(pooled):
            raise ValueError(f"{len(latent_params)} latents, {len(prompt_embeds)} prompt embeddings and "
                             f"{len(pooled)} pooled embeddings: one of each per image")
        self.latent_params, self.prompt_embeds, self.pooled = latent_params, prompt_embeds, pooled
        self.shift_factor, self.scaling_factor = shift_factor, scaling_factor

    def __len__(self) -> int:
        return len(self.latent_params)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        latents = sample_latents(self.latent_params[index:index + 1], self.shift_factor, self.scaling_factor)[0]
        return {"latents": latents, "prompt_embeds": self.prompt_embeds[index],
                "pooled_prompt_embeds": self.pooled[index]}


@dataclass
class SD3Options:
    """The SD3-specific settings (the engine's `TrainingArguments` hold the rest)."""

    pretrained_model_name_or_path: str
    instance_data_dir: str
    instance_prompt: str | None = None
    revision: str | None = None
    variant: str | None = None
    resolution: int = 512
    max_sequence_length: int = 77
    streams: tuple[str, ...] = ("image", "text")
    gradient_checkpointing: bool = False
    flow: FlowMatching = FlowMatching()
    validation_prompt: str | None = None
    num_validation_images: int = 4
    validation_inference_steps: int = 28
    validation_guidance_scale: float = 7.0
    export_lora: bool = False
    skip_bad_images: bool = False

    def __post_init__(self) -> None:
        self.streams = parse_streams(self.streams)
        for name in ("resolution", "max_sequence_length", "num_validation_images", "validation_inference_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.max_sequence_length > 512:
            raise ValueError(f"--max-sequence-length {self.max_sequence_length}: SD3's T5 takes at most 512 tokens")


def parse_streams(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """'image' / 'image,text' (or a sequence) -> a tuple of stream names, checked."""
    streams = tuple(s.strip() for s in value.split(",")) if isinstance(value, str) else tuple(value)
    unknown = [s for s in streams if s not in STREAMS]
    if not streams or unknown or len(set(streams)) != len(streams):
        raise ValueError(f"--streams {value!r}: pass 'image' or 'image,text' (the streams are {STREAMS})")
    return streams


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The frozen weights' dtype under `mixed_precision` (diffusers' training scripts' `weight_dtype`)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


class SD3Task(Task):
    """`engine.Task` for SD3 / SD3.5: see the module docstring. Build it from `SD3Options`."""

    name = "train-sd3"

    def __init__(self, options: SD3Options) -> None:
        self.options = options
        self.pipe = None
        self.model = None  # the adapted transformer (a PeftModel with --method lora); trained in place by `train`
        self.dataset: PrecomputedSD3Dataset | None = None
        self.scheduler = None
        self.info = None
        self.data_facts: dict = {}
        self.validation_embeds: dict = {}
        self.global_step = 0
        self.seed = 0
        self.output_dir: Path | None = None

    # ---- engine interface

    def build(self, args, accelerator):
        from diffusers import FlowMatchEulerDiscreteScheduler

        opts = self.options
        self.output_dir, self.seed = Path(args.output_dir), args.seed
        examples = scan_instance_folder(opts.instance_data_dir, opts.instance_prompt)
        examples, skipped = check_images(examples, opts.skip_bad_images)
        dtype = weight_dtype(args.mixed_precision)
        pipe = load_pipeline(opts, dtype)
        check_resolution(pipe, opts.resolution)
        model = self.adapt(pipe.transformer, args)
        # A copy of the training schedule: validation's set_timesteps must not change it (diffusers does the same).
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

        device = accelerator.device
        pipe.vae.to(device)
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            getattr(pipe, name).to(device)
        prompts = [e.caption for e in examples]
        extra = [opts.validation_prompt, ""] if opts.validation_prompt else []
        embeddings = encode_captions(pipe, prompts + extra, opts.max_sequence_length)
        free_text_encoders(pipe)
        self.validation_embeds = {p: embeddings[p] for p in extra}
        latent_params = encode_latent_distributions(pipe, [e.image for e in examples], opts.resolution)
        pipe.transformer = None  # the pipeline keeps the VAE, tokenizers and scheduler for validation
        self.pipe = pipe
        vae = pipe.vae.config
        dataset = PrecomputedSD3Dataset(latent_params, torch.stack([embeddings[p][0] for p in prompts]),
                                        torch.stack([embeddings[p][1] for p in prompts]), vae.shift_factor,
                                        vae.scaling_factor)
        self.dataset = dataset
        self.data_facts = {"images": len(examples), "captions": len(set(prompts)), "skipped": skipped}
        return TaskSetup(model=model, train_dataset=dataset)

    def adapt(self, transformer, args):
        """Freeze `transformer` and add `args.method`'s adapters (fp32, as diffusers trains them over
        fp16/bf16 weights) on `options.streams`; sets `self.model` and `self.info`, returns the model."""
        from diffusers.training_utils import cast_training_params

        from .methods import apply_method

        transformer.requires_grad_(False)
        if self.options.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        _check_transformer(transformer)
        model, self.info = apply_method(transformer, args.method, rank=args.rank, alpha=args.alpha,
                                        dropout=args.dropout, streams=self.options.streams)
        cast_training_params(model, torch.float32)
        self.model = model
        return model

    def loss(self, model, batch: dict) -> torch.Tensor:
        latents = batch["latents"]
        noise = torch.randn_like(latents)
        noisy, timesteps, sigmas = self.options.flow.noisy_inputs(latents, noise, self.scheduler)
        pred = model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=batch["prompt_embeds"],
                     pooled_projections=batch["pooled_prompt_embeds"], return_dict=False)[0]
        return self.options.flow.loss(pred, noisy, latents, noise, sigmas)

    @torch.no_grad()
    def fixed_noise_loss(self, model, examples: int = FIXED_NOISE_EXAMPLES, draws: int = 4) -> float:
        """The loss on the first `examples` training images, `draws` each, with latents, noise and timesteps
        drawn from the run's seed: comparable from one evaluation to the next (the training loss is not)."""
        generator = torch.Generator().manual_seed(self.seed)
        device = next(model.parameters()).device
        data, losses = self.dataset, []
        for i in range(min(len(data), examples)):
            params = data.latent_params[i:i + 1].expand(draws, -1, -1, -1)
            latents = sample_latents(params, data.shift_factor, data.scaling_factor, generator)
            noise = torch.randn(latents.shape, generator=generator)
            noisy, timesteps, sigmas = self.options.flow.noisy_inputs(latents, noise, self.scheduler, generator)
            latents, noise, noisy, sigmas = (t.to(device) for t in (latents, noise, noisy, sigmas))
            pred = model(hidden_states=noisy, timestep=timesteps.to(device),
                         encoder_hidden_states=data.prompt_embeds[i:i + 1].expand(draws, -1, -1).to(device),
                         pooled_projections=data.pooled[i:i + 1].expand(draws, -1).to(device), return_dict=False)[0]
            losses.append(self.options.flow.loss(pred, noisy, latents, noise, sigmas).item())
        return sum(losses) / len(losses)

    def evaluate(self, model, accelerator) -> dict[str, float]:
        """`val_loss` (the fixed-noise loss) and, with a validation prompt, images at a fixed seed (main
        process), saved as PNGs under output_dir/validation."""
        metrics = {"val_loss": self.fixed_noise_loss(model)}
        opts = self.options
        if not opts.validation_prompt or not accelerator.is_main_process:
            return metrics
        from diffusers import StableDiffusion3Pipeline

        transformer = model.get_base_model() if hasattr(model, "get_base_model") else model
        pipe = StableDiffusion3Pipeline(**{**self.pipe.components, "transformer": transformer,
                                           "scheduler": type(self.scheduler).from_config(self.scheduler.config)})
        pipe.set_progress_bar_config(disable=True)
        embeds, pooled = (t[None].to(accelerator.device) for t in self.validation_embeds[opts.validation_prompt])
        negative, negative_pooled = (t[None].to(accelerator.device) for t in self.validation_embeds[""])
        generator = torch.Generator(accelerator.device).manual_seed(self.seed)
        folder = self.output_dir / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(opts.num_validation_images):
            image = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative,
                         negative_pooled_prompt_embeds=negative_pooled, height=opts.resolution, width=opts.resolution,
                         num_inference_steps=opts.validation_inference_steps,
                         guidance_scale=opts.validation_guidance_scale,
                         generator=generator).images[0]
            _save_png(image, folder / f"step-{self.global_step:06d}-{i}.png")
        return metrics

    def save(self, model, output_dir: Path) -> Path:
        """Serial: `serial_lora_weights.safetensors` (+ `pytorch_lora_weights.safetensors` with --export-lora);
        LoRA: diffusers' `pytorch_lora_weights.safetensors` (stock `pipe.load_lora_weights`)."""
        import diffusers_loader

        base = self.options.pretrained_model_name_or_path
        if self.info.method == "lora":
            return save_peft_lora(model, output_dir)
        path = model.save_serial_lora_adapter(output_dir, base_model=base)
        if self.options.export_lora:
            diffusers_loader.export_to_lora(model, Path(output_dir) / LORA_WEIGHT_NAME)
        return path

    def card(self) -> dict:
        opts, info = self.options, self.info
        skipped = self.data_facts.get("skipped", [])
        # Runnable as written from the folder holding the card (its files are next to it).
        if info.method == "lora":
            load = [f'pipe.load_lora_weights(".", weight_name="{LORA_WEIGHT_NAME}")']
        else:
            load = ['import diffusers_loader  # adds load_serial_lora_weights to SD3 pipelines',
                    'pipe.load_serial_lora_weights(".")  # serial_lora_weights.safetensors of this folder']
            if opts.export_lora:
                load.append(f'# stock diffusers, same outputs: pipe.load_lora_weights(".", '
                            f'weight_name="{LORA_WEIGHT_NAME}")')
        return {
            "title": f"{'Serial LoRA' if info.method == 'serial' else 'LoRA'} for SD3: "
                     f"{opts.pretrained_model_name_or_path}",
            "base_model": opts.pretrained_model_name_or_path,
            "method_label": f"{'Serial LoRA' if info.method == 'serial' else 'LoRA (PEFT)'} "
                            f"(streams: {','.join(opts.streams)})",
            "adapter_parameters": info.adapter_parameters,
            "lora_parameters_note": info.note,
            "data": (f"{self.data_facts.get('images')} images from `{opts.instance_data_dir}`, "
                     f"{self.data_facts.get('captions')} distinct caption(s), {opts.resolution} px"
                     + (f"; {len(skipped)} unreadable image(s) skipped" if skipped else "")),
            "summary_rows": {"images": self.data_facts.get("images"), "skipped images": len(skipped),
                             # DreamBooth data has no held-out split: say what "val loss" was measured on.
                             "val loss on": f"the first {min(self.data_facts.get('images') or 0, FIXED_NOISE_EXAMPLES)} "
                                            "training images, fixed noise and timesteps",
                             "weighting scheme": opts.flow.weighting_scheme,
                             "precondition outputs": int(opts.flow.precondition_outputs),
                             **({"why not 4x": "the last joint block has no to_add_out (context_pre_only)"}
                                if "text" in opts.streams and info.lora_parameters != 4 * info.serial_parameters
                                else {})},
            "usage": ["## Use", "", "```python", "from diffusers import StableDiffusion3Pipeline",
                      f"pipe = StableDiffusion3Pipeline.from_pretrained({opts.pretrained_model_name_or_path!r})",
                      *load, "```"],
        }

    def fingerprint(self) -> dict:
        opts = self.options
        return {"pretrained_model_name_or_path": opts.pretrained_model_name_or_path, "revision": opts.revision,
                "variant": opts.variant, "instance_data_dir": str(Path(opts.instance_data_dir).resolve()),
                "instance_prompt": opts.instance_prompt, "resolution": opts.resolution,
                "max_sequence_length": opts.max_sequence_length, "streams": list(opts.streams),
                "flow": {k: getattr(opts.flow, k) for k in FlowMatching.__dataclass_fields__}}


LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def load_pipeline(opts: SD3Options, dtype: torch.dtype):
    """The SD3 pipeline (hub id or local folder) with frozen weights in `dtype` and the VAE in float32."""
    import diffusers_loader  # noqa: F401  (adds the Serial LoRA methods to SD3's classes)
    from diffusers import StableDiffusion3Pipeline

    try:
        with warnings.catch_warnings():
            # diffusers >= 0.42 renames torch_dtype to dtype; torch_dtype keeps older versions working.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = StableDiffusion3Pipeline.from_pretrained(
                opts.pretrained_model_name_or_path, revision=opts.revision, variant=opts.variant,
                torch_dtype={"default": dtype, "vae": torch.float32})  # diffusers' scripts keep the VAE in float32
    except (OSError, ValueError, EnvironmentError) as err:
        raise SerialLoraError(f"--pretrained-model-name-or-path {opts.pretrained_model_name_or_path!r}: cannot load "
                              f"an SD3 pipeline ({type(err).__name__}: {err}); pass a hub id or a folder written "
                              "by save_pretrained") from err
    missing = [n for n in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
               if getattr(pipe, n, None) is None]
    if missing:
        raise SerialLoraError(f"--pretrained-model-name-or-path {opts.pretrained_model_name_or_path!r} has no "
                              f"{', '.join(missing)}; the trainer needs the whole SD3 pipeline")
    return pipe


def check_resolution(pipe, resolution: int) -> None:
    """Refuse a resolution the transformer cannot take (not a multiple of VAE factor x patch, or too large)."""
    config = pipe.transformer.config
    step = pipe.vae_scale_factor * config.patch_size
    if resolution % step:
        raise SerialLoraError(f"--resolution {resolution} is not a multiple of {step} (VAE factor "
                              f"{pipe.vae_scale_factor} x patch size {config.patch_size})")
    patches = resolution // step
    if config.pos_embed_max_size is not None and patches > config.pos_embed_max_size:
        raise SerialLoraError(f"--resolution {resolution} gives {patches} patches per side, more than this "
                              f"transformer's pos_embed_max_size {config.pos_embed_max_size}; use --resolution "
                              f"{config.pos_embed_max_size * step} or less")


def _check_transformer(transformer) -> None:
    from diffusers_loader.transformer import check_transformer

    check_transformer(transformer, "train a Serial LoRA")


def save_peft_lora(model, output_dir: Path) -> Path:
    """A PEFT LoRA transformer as diffusers' `pytorch_lora_weights.safetensors` (keys `transformer.*`)."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    transformer = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = get_peft_model_state_dict(transformer)
    atomic_write(Path(output_dir) / LORA_WEIGHT_NAME, lambda tmp: StableDiffusion3Pipeline.save_lora_weights(
        Path(tmp).parent, transformer_lora_layers=layers, weight_name=Path(tmp).name))
    return Path(output_dir) / LORA_WEIGHT_NAME


def _save_png(image, path: Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


# ---------------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`serial-lora train-sd3` options: the engine's (defaults as diffusers' SD3 DreamBooth script) + SD3's."""
    from .engine import add_training_arguments

    add_training_arguments(parser, rank=4, dropout=0.0, learning_rate=1e-4, train_batch_size=4, weight_decay=1e-4)
    g = parser.add_argument_group("SD3")
    g.add_argument("--pretrained-model-name-or-path", "--pretrained_model_name_or_path",
                   dest="pretrained_model_name_or_path", required=True,
                   help="hub id or local folder of an SD3 / SD3.5 diffusers pipeline")
    g.add_argument("--revision")
    g.add_argument("--variant", help="e.g. fp16 weights of the repo")
    g.add_argument("--instance-data-dir", "--instance_data_dir", dest="instance_data_dir", required=True,
                   help="folder of training images; <name>.txt next to an image is its caption")
    g.add_argument("--instance-prompt", "--instance_prompt", dest="instance_prompt",
                   help="caption of the images without a .txt (e.g. 'a photo of sks dog')")
    g.add_argument("--skip-bad-images", dest="skip_bad_images", action="store_true",
                   help="skip unreadable images (counted in the summary) instead of stopping")
    g.add_argument("--resolution", type=int, default=512)
    g.add_argument("--max-sequence-length", dest="max_sequence_length", type=int, default=77, help="T5 tokens")
    g.add_argument("--streams", default="image,text",
                   help="'image' (to_q/k/v input) or 'image,text' (also add_q/k/v_proj's input; default)")
    g.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true")
    g.add_argument("--weighting-scheme", dest="weighting_scheme", choices=WEIGHTING_SCHEMES, default="logit_normal")
    g.add_argument("--logit-mean", dest="logit_mean", type=float, default=0.0)
    g.add_argument("--logit-std", dest="logit_std", type=float, default=1.0)
    g.add_argument("--mode-scale", dest="mode_scale", type=float, default=1.29)
    g.add_argument("--precondition-outputs", dest="precondition_outputs", type=int, choices=(0, 1), default=1,
                   help="1 (default, as diffusers): predict x_0 through pred * -sigma + x_t; 0: target noise - x_0")
    g.add_argument("--validation-prompt", dest="validation_prompt",
                   help="images of this prompt every --validation-steps steps and at the end (fixed seed)")
    g.add_argument("--num-validation-images", dest="num_validation_images", type=int, default=4)
    g.add_argument("--validation-inference-steps", dest="validation_inference_steps", type=int, default=28)
    g.add_argument("--validation-guidance-scale", dest="validation_guidance_scale", type=float, default=7.0)
    g.add_argument("--export-lora", dest="export_lora", action="store_true",
                   help="also write the exact standard LoRA (pytorch_lora_weights.safetensors) for stock diffusers "
                        "(--method lora writes only that file anyway)")


def options_from_namespace(args: argparse.Namespace) -> SD3Options:
    flow = FlowMatching(args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale,
                        bool(args.precondition_outputs))
    names = set(SD3Options.__dataclass_fields__) - {"flow"}
    return SD3Options(flow=flow, **{k: v for k, v in vars(args).items() if k in names})


def main(args: argparse.Namespace) -> int:
    """Run `serial-lora train-sd3` with parsed arguments; exit status 2 on bad input."""
    return task_main(args, lambda: SD3Task(options_from_namespace(args)))


if __name__ == "__main__":  # python -m serial_lora_train.sd3 (e.g. under accelerate launch -m)
    sys.exit(main(task_parser("serial-lora train-sd3", __doc__, add_arguments).parse_args()))
