"""Every ```python block of the READMEs runs as written, so the documentation cannot rot.

How the harness works (read this before adding a ```python block to a file of DOCS):

1. Every ```python block of every file in DOCS is one test case, collected automatically (id
   `README.md:LINE`). A new block is picked up and must run. Code that is not meant to run is
   fenced ```text (shell commands: ```bash); every fence must name its language.
2. A block runs in its own Python process (ComfyUI and the loaders change global state), offline
   (HF_HUB_OFFLINE=1, one thread), in an empty temporary working directory, in a fresh namespace
   holding only `tiny` (a `Tiny`). Tracebacks point at the README's own lines, and a warning raised
   at a README line is an error (e.g. the timm plugin's "adapter on random base weights").
3. Big models and hub ids become tiny local ones by plain text substitution: SUBSTITUTIONS maps an
   exact piece of README text (it may occur in several blocks) to the code that replaces it on the
   same line, usually a call on `tiny`. An entry that matches no block fails
   `test_every_substitution_is_used`, so the table never keeps stale entries.
4. Files a block reads are made by `Tiny.FILES` (name in the working directory -> method that writes
   it); a file is made only for a block that mentions its name.
5. A block that imports ComfyUI (`comfy`, `folder_paths`) gets third_party/ComfyUI on sys.path.

To document a new big model: add its exact README text to SUBSTITUTIONS with a tiny replacement
(add a method to `Tiny` when needed, building it in code as the other tests do), and any file it
reads to `Tiny.FILES`. Run: `.venv/bin/python -m pytest -q tests/test_readme_snippets.py`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
DOCS = ("README.md", "comfyui_nodes/README.md")
FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
LANGUAGES = {"python", "bash", "text", "json", "toml"}
TIMM_TINY = dict(depth=2, embed_dim=32, num_heads=2)
"""timm ViTs keep their image and patch size (so the README's input shapes stay valid), not their width."""

SUBSTITUTIONS: dict[str, str] = {
    '"vit_base_patch16_224", pretrained=True,': '"vit_base_patch16_224", pretrained=True, **tiny.timm("vit_base_patch16_224"),',
    '"vit_base_patch16_clip_224.serial_lora", pretrained=True,':
        '"vit_base_patch16_clip_224.serial_lora", pretrained=True, **tiny.timm("vit_base_patch16_clip_224"),',
    'StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3-medium-diffusers")': "tiny.sd3_pipeline()",
    '"user/sd3-style-serial-lora"': '"sd3-style"',
    'CLIPModel.from_pretrained("openai/clip-vit-base-patch16")': "tiny.clip()",
    'tp.from_pretrained("openai/clip-vit-base-patch16",': "tp.from_pretrained(tiny.clip_folder(),",
    'SamModel.from_pretrained("facebook/sam-vit-base")': "tiny.sam()",
}


def python_blocks() -> list[tuple[str, int, str]]:
    """(document, first code line, code) of every ```python block of DOCS."""
    blocks = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for match in FENCE.finditer(text):
            if match.group(1) == "python":
                blocks.append((doc, text.count("\n", 0, match.start(2)) + 1, match.group(2)))
    return blocks


def substituted(code: str) -> str:
    for original, tiny in SUBSTITUTIONS.items():
        code = code.replace(original, tiny)
    return code


class Tiny:
    """Tiny local stand-ins for the big models, hub ids and files of the READMEs; one cache folder for all."""

    FILES = {
        "adapter.safetensors": "timm_adapter",
        "sd3-style": "sd3_adapter_folder",
        "subject": "sd3_adapter_folder",
    }

    def __init__(self, cache: Path) -> None:
        self.cache = cache

    def timm(self, architecture: str) -> dict[str, Any]:
        """`timm.create_model` arguments giving `architecture` TIMM_TINY sizes and local base weights
        (what `pretrained=True` loads: `pretrained_cfg_overlay=dict(file=...)`)."""
        import timm
        from safetensors.torch import save_file

        classes = timm.models.get_pretrained_cfg(architecture).num_classes
        path = self.cache / f"{architecture}.base.safetensors"
        if not path.exists():
            import torch

            torch.manual_seed(0)
            model = timm.create_model(architecture, num_classes=classes, **TIMM_TINY)
            save_file(model.state_dict(), str(path))
        return dict(TIMM_TINY, pretrained_cfg_overlay=dict(file=str(path), num_classes=classes))

    def sd3_pipeline(self):
        from sd3_tiny import tiny_sd3_pipeline

        return tiny_sd3_pipeline()

    def clip(self):
        from hf_tiny import tiny_clip

        return tiny_clip()

    def clip_folder(self) -> Path:
        """A `from_pretrained` folder of the same tiny CLIP as `clip()`."""
        from hf_tiny import save_tiny_clip_folder

        folder = self.cache / "tiny-clip"
        return folder if folder.exists() else save_tiny_clip_folder(folder)

    def sam(self):
        from hf_tiny import tiny_sam

        return tiny_sam()

    def timm_adapter(self, path: Path, seed: int = 0) -> None:
        """A trained-looking Serial LoRA (and a 10-class head) of the tiny vit_base_patch16_clip_224."""
        import timm
        import torch

        import timm_plugin  # noqa: F401
        from serial_lora_core import save_serial_lora

        torch.manual_seed(seed)
        model = timm.create_model("vit_base_patch16_clip_224.serial_lora", pretrained=True, num_classes=10,
                                  **self.timm("vit_base_patch16_clip_224"))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1)
        save_serial_lora(model, path, modules_to_save=("head",))

    def sd3_adapter_folder(self, path: Path, seed: int = 0) -> None:
        """A folder holding a Serial LoRA (image and text streams) of the tiny SD3 pipeline's transformer."""
        import torch

        import diffusers_loader
        from sd3_tiny import tiny_sd3_transformer
        from serial_lora_core import SerialLoraConfig

        transformer = tiny_sd3_transformer()
        diffusers_loader.add_serial_lora(transformer, SerialLoraConfig(rank=4, streams=("image", "text")))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in transformer.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1, generator=generator)
        transformer.save_serial_lora_adapter(path)

    def provide(self, code: str, workdir: Path) -> None:
        """Copy into `workdir` every file of FILES that `code` mentions (made once, in the cache)."""
        for name, maker in self.FILES.items():
            if name not in code:
                continue
            made = self.cache / "files" / name
            if not made.exists():
                made.parent.mkdir(parents=True, exist_ok=True)
                getattr(self, maker)(made)
            (shutil.copytree if made.is_dir() else shutil.copy)(made, workdir / name)


def run_block(doc: str, line: int, code: str, cache: str) -> None:
    """Run one block in this process (called in the block's subprocess by `test_python_block_runs`)."""
    workdir = Path.cwd()
    tiny = Tiny(Path(cache))
    tiny.provide(code, workdir)
    if re.search(r"^\s*(import|from)\s+(comfy|folder_paths)\b", code, re.M):
        sys.path.append(str(ROOT / "third_party" / "ComfyUI"))
    source = "\n" * (line - 1) + code  # so a traceback names the README's own line
    warnings.filterwarnings("error", module="__readme__")  # a README line that warns shows a mistake
    exec(compile(source, str(ROOT / doc), "exec"), {"__name__": "__readme__", "tiny": tiny})


BLOCKS = python_blocks()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("readme_tiny")


@pytest.mark.parametrize(("doc", "line", "code"), BLOCKS, ids=[f"{doc}:{line}" for doc, line, _ in BLOCKS])
def test_python_block_runs(doc, line, code, cache, tmp_path):
    program = (f"import sys; sys.path[:0] = [{str(TESTS)!r}, {str(ROOT)!r}]\n"
               "from test_readme_snippets import run_block\n"
               f"run_block({doc!r}, {line}, {substituted(code)!r}, {str(cache)!r})\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"{doc}:{line} failed:\n{result.stderr[-4000:]}"


def test_every_substitution_is_used():
    code = "".join(block for _, _, block in BLOCKS)
    stale = [original for original in SUBSTITUTIONS if original not in code]
    assert not stale, f"SUBSTITUTIONS entries that match no ```python block (remove or update them): {stale}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_fence_names_a_known_language(doc):
    """A block without a language (or a misspelt one) would silently escape this test."""
    text = (ROOT / doc).read_text()
    opened = [text.count("\n", 0, m.start()) + 1 for m in re.finditer(r"^```", text, re.M)]
    languages = [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in FENCE.finditer(text)]
    assert len(opened) == 2 * len(languages), f"{doc}: unbalanced ``` fences at lines {opened}"
    unknown = [(line, lang) for line, lang in languages if lang not in LANGUAGES]
    assert not unknown, f"{doc}: fences with no or an unknown language (line, language): {unknown}; use one of {LANGUAGES}"


def test_substitution_keeps_line_numbers():
    """Replacements stay on their line, so tracebacks point at the README's own lines."""
    assert all("\n" not in tiny for tiny in SUBSTITUTIONS.values())
