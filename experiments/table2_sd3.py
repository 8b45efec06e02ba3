"""The paper's Table II: SD3 style fine-tuning with 20/50/100% of each style's images, LoRA vs Serial LoRA (and the
LoRA+ pair), end to end through `serial-lora train-sd3`, scored by FID and CLIP score from torchmetrics.

With real data (the paper: SD3-medium, rank 64, lr 1.5e-5, 10 epochs; 28 steps, 1024 px, guidance 7.0):

    python -m experiments.table2_sd3 --model stabilityai/stable-diffusion-3-medium-diffusers \\
        --data-root /data/styles --datasets barbie cyberpunk --clip-model /models/clip-vit-large-patch14 \\
        --fid-weights /models/pt_inception-2015-12-05-6726825d.pth --out results/table2 \\
        --rank 64 --learning-rate 1.5e-5 --resolution 1024 --mixed-precision bf16

`--model`: a cached hub id or a local `save_pretrained` SD3 pipeline folder. `<data-root>/<style>/train/` holds the
training images with a `.txt` caption each; `<data-root>/<style>/test/` the held-out style images and captions:
the test captions are the prompts, the test images the FID reference. `--clip-model`: a local CLIPModel +
CLIPProcessor folder for torchmetrics' CLIPScore (the paper follows [19]; pick the CLIP you report with).
`--fid-weights`: torch-fidelity's Inception weights file for torchmetrics' FrechetInceptionDistance (which
would otherwise download them). Options after the known ones go to train-sd3 unchanged. The 20/50/100% rows
train on that share of the training images, drawn with the seed.

`--smoke` runs everything on a tiny random-weight SD3 pipeline, a tiny random CLIP for CLIPScore and a tiny
random convolutional feature extractor instead of Inception for FID (so FID values are not comparable to any
published FID), on procedural images, in seconds (CI); its table says so.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from experiments.common import smoke_banner, write_results
from experiments.tables import (SMOKE_ARGS, base_record, layout, resolve, run_grid, table_parser, tests_module,
                               write_class_folders)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class TinyFeatures(nn.Module):
    """Smoke-mode stand-in for FID's Inception: a fixed random conv + global pooling (16 features)."""

    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, self.num_features, 5, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=torch.Generator().manual_seed(0)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(images.float() / 255.0)).mean((2, 3)).double()


class TensorFeatures(nn.Module):
    """A CLIPModel whose get_image/text_features return tensors: torchmetrics 1.9's CLIPScore expects that, while
    transformers 5 returns an output object (the projected embeddings are its pooler_output)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _tensor(self.model.get_text_features(*args, **kwargs))


def _tensor(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def pairs(folder: Path) -> list[tuple[Path, str]]:
    """(image, caption) pairs of a style folder, sorted; a missing caption is an error naming the image."""
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise ValueError(f"{folder} holds no image; put the style's images there with a .txt caption each")
    missing = [p.name for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        raise ValueError(f"{folder}: no caption (.txt) for {missing[:5]}; every image needs one")
    return [(p, p.with_suffix(".txt").read_text().strip()) for p in images]


def subset(train_dir: Path, fraction: float, seed: int, into: Path) -> Path:
    """A copy of `fraction` of the training pairs (at least one), drawn with `seed`."""
    chosen = pairs(train_dir)
    random.Random(seed).shuffle(chosen)
    into.mkdir(parents=True, exist_ok=True)
    for image, _ in chosen[: max(1, round(fraction * len(chosen)))]:
        shutil.copy(image, into / image.name)
        shutil.copy(image.with_suffix(".txt"), into / image.with_suffix(".txt").name)
    return into


def load_images(paths: list[Path], size: int) -> torch.Tensor:
    """uint8 (N, 3, size, size) images, resized (torchvision) as the generated ones are."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor, resize

    return torch.stack([resize(pil_to_tensor(Image.open(p).convert("RGB")), [size, size], antialias=True) for p in paths])


def score(args: argparse.Namespace, base: str, output_dir: Path, method: str, test: list[tuple[Path, str]],
          clip_loader: Any, fid_feature: Any) -> dict[str, float]:
    """Generate one image per held-out caption with the trained adapter; FID vs the held-out images, CLIP score."""
    import diffusers_loader  # noqa: F401  (adds load_serial_lora_weights to SD3 pipelines)
    from diffusers import StableDiffusion3Pipeline
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.multimodal.clip_score import CLIPScore

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = StableDiffusion3Pipeline.from_pretrained(base).to(device)
    if "Serial" in method:
        pipe.load_serial_lora_weights(str(output_dir))
    else:
        pipe.load_lora_weights(str(output_dir))
    prompts = [caption for _, caption in test]
    generated = []
    for i, prompt in enumerate(prompts):
        out = pipe(prompt, num_inference_steps=args.inference_steps, guidance_scale=args.guidance_scale,
                   height=args.resolution, width=args.resolution, generator=torch.Generator(device).manual_seed(i),
                   output_type="pt", **({"max_sequence_length": 16} if args.smoke else {}))
        generated.append((out.images[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu())
    fake = torch.stack(generated)
    real = load_images([p for p, _ in test], args.resolution)
    fid = FrechetInceptionDistance(**fid_feature)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    clip = CLIPScore(model_name_or_path=clip_loader)
    clip.update(fake, prompts)
    return {"fid": float(fid.compute()), "clip_score": float(clip.compute()) / 100.0}  # CLIPScore is 100 x cosine


def smoke_setup(root: Path) -> tuple[str, Path, list[str], str]:
    """A tiny random SD3 pipeline, a tiny random CLIP folder and one procedural "style" with captions."""
    sd3_tiny = tests_module("sd3_tiny")
    sd3_tiny.tiny_sd3_pipeline().save_pretrained(root / "tiny_sd3")
    clip = tests_module("hf_tiny").save_tiny_clip_folder(root / "tiny_clip")
    for split, per_class, seed in (("train", 2, 0), ("test", 1, 1)):
        folder = write_class_folders(root / "classes" / split, classes=3, per_class=per_class, size=32, seed=seed)
        target = root / "data" / "shapes" / split
        target.mkdir(parents=True)
        for image in sorted(folder.glob("*/*.png")):
            shutil.copy(image, target / f"{image.parent.name}_{image.name}")
            (target / f"{image.parent.name}_{image.stem}.txt").write_text(f"a {image.parent.name}")
    return str(root / "tiny_sd3"), root / "data", ["shapes"], str(clip), None


def run(args: argparse.Namespace, base: str, data_root: Path, datasets: list[str], clip_model: str,
        work: Path) -> list[dict[str, Any]]:
    from transformers import CLIPModel, CLIPProcessor

    clip_loader = lambda: (TensorFeatures(CLIPModel.from_pretrained(clip_model)), CLIPProcessor.from_pretrained(clip_model))  # noqa: E731
    fid_feature = {"feature": TinyFeatures()} if args.smoke else {"feature": 2048, "feature_extractor_weights_path": args.fid_weights}
    tests = {dataset: pairs(data_root / dataset / "test") for dataset in datasets}

    def argv(dataset: str, fraction: float, seed: int) -> list[str]:
        train_dir = subset(data_root / dataset / "train", fraction, seed, work / dataset / f"{fraction}_{seed}")
        options = ["--pretrained-model-name-or-path", base, "--instance-data-dir", str(train_dir), "--seed", str(seed),
                   "--resolution", str(args.resolution)]
        return options + ([*SMOKE_ARGS, "--max-sequence-length", "16"] if args.smoke else
                          ["--num-train-epochs", str(args.epochs), *args.extra])

    def metrics(dataset: str, method: str, output_dir: Path) -> dict[str, float]:
        return score(args, base, output_dir, method, tests[dataset], clip_loader, fid_feature)

    return run_grid("train-sd3", Path(args.out), datasets, args.fractions, args.methods, args.seeds, argv, metrics)


def markdown(record: dict[str, Any]) -> str:
    head = (smoke_banner(record["smoke"]) + f"# Table II (SD3 style: FID ↓ and CLIP score ↑, mean ± std over "
            f"{record['seeds']} seed(s))\n\nModel `{record['model']}`; CLIP score model `{record['clip_model']}`; FID "
            f"features: {record['fid_features']}; {record['environment']['device']}; real data: "
            f"{'no (smoke)' if record['smoke'] else 'yes'}.\n\n")
    label = lambda f: f"{f * 100:g}% shot"  # noqa: E731
    args = (record["runs"], record["datasets"], record["fractions"], record["methods"])
    return (head + "## FID (lower is better)\n\n" + layout(*args, "fid", label, scale=1.0, digits=2)
            + "\n## CLIP score (cosine, higher is better)\n\n" + layout(*args, "clip_score", label, scale=1.0, digits=4))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = table_parser(__doc__, "SD3", "folder with <style>/train and <style>/test (images + .txt captions)",
                          "--fractions", float, [0.2, 0.5, 1.0], epochs=10)
    parser.add_argument("--clip-model", dest="clip_model", help="local CLIPModel + CLIPProcessor folder for CLIPScore")
    parser.add_argument("--fid-weights", dest="fid_weights", help="torch-fidelity Inception weights file for FID")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--inference-steps", dest="inference_steps", type=int, default=28)
    parser.add_argument("--guidance-scale", dest="guidance_scale", type=float, default=7.0)
    args, args.extra = parser.parse_known_args(argv)  # anything else goes to train-sd3 (e.g. --rank 64)
    if args.smoke:
        args.fractions, args.seeds, args.resolution, args.inference_steps = [0.5], 1, 32, 2
    with tempfile.TemporaryDirectory() as tmp:
        model, data_root, datasets, clip_model, _ = resolve(parser, args, smoke_setup, Path(tmp),
                                                            required=("clip_model", "fid_weights"))
        record = {**base_record("II", args, "SD3", model, datasets), "fractions": args.fractions,
                  "clip_model": "tiny random CLIP (smoke)" if args.smoke else clip_model,
                  "fid_features": "tiny random conv features (smoke: not Inception)" if args.smoke else
                  f"Inception v3 pool 2048 ({args.fid_weights})", "resolution": args.resolution,
                  "inference_steps": args.inference_steps, "guidance_scale": args.guidance_scale,
                  "runs": run(args, model, data_root, datasets, clip_model, Path(tmp) / "subsets")}
    write_results(args.out, "table2_sd3", record, markdown(record))
    return record


if __name__ == "__main__":
    main()
