#!/usr/bin/env bash
# One-command set-up on a fresh CPU-only machine (Linux, Python 3.11 + pip), of only what a command needs:
#   bash scripts/setup.sh quickstart   -> .venv with CPU torch + the library with [timm] + PEFT
#   bash scripts/setup.sh [test]       -> the above + every extra of pyproject.toml (diffusers, transformers,
#                                         test tools, ...) + ComfyUI and a browser (scripts/setup_comfyui.sh)
# Idempotent and stamped per component ($VENV/.serial-lora-setup-<component>-<hash of its inputs>): a
# second run with unchanged inputs returns in about a second; a changed input re-runs only its component.
# Environment knobs: SERIAL_LORA_VENV (default .venv), SERIAL_LORA_COMFYUI (default third_party/ComfyUI),
# PYTHON (default python3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TARGET=${1:-test}
case "$TARGET" in
  quickstart|test) ;;
  *) echo "usage: bash scripts/setup.sh [quickstart|test]   (got '$TARGET')" >&2; exit 2 ;;
esac
VENV=${SERIAL_LORA_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check -q)

# The inputs of both pip components; a change to any of them re-runs the component.
inputs_hash=$(cat constraints.txt pyproject.toml scripts/setup.sh scripts/torchvision_cpu_ops.py | sha256sum | cut -c1-16)

# Runs "$@" unless component $1's stamp for the current inputs exists; then stamps it.
component() {
  local name=$1 stamp="$VENV/.serial-lora-setup-$1-$inputs_hash"
  shift
  [ -f "$stamp" ] && return 0
  "$@"
  rm -f "$VENV/.serial-lora-setup-$name-"*
  touch "$stamp"
}

# torchvision from the index is a CUDA build whose ops cannot load beside CPU torch; this start-up hook
# lives in the environment, not in the library (a normal install needs none of it).
torchvision_hook() {
  local site
  site=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  rm -f "$site/torchvision_cpu_ops.pth" "$site/_torchvision_cpu_ops.py"
  if ! "$VPY" -c "import torchvision" 2>/dev/null; then
    cp scripts/torchvision_cpu_ops.py "$site/_torchvision_cpu_ops.py"
    echo "import _torchvision_cpu_ops" > "$site/torchvision_cpu_ops.pth"
    "$VPY" -c "import torchvision, timm"
  fi
}

install_base() {
  # torch first, exactly pinned: any looser requirement resolves to a multi-GB CUDA build.
  "${PIP[@]}" install "torch==2.13.0"
  # The quick start needs timm and PEFT only, not the trainers' other packages (diffusers, torchmetrics,
  # ...): PEFT's requirement is taken from the train extra, its one place.
  local peft
  peft=$(grep -o '"peft[^"]*"' pyproject.toml | head -1 | tr -d '"')
  "${PIP[@]}" install -c constraints.txt -e ".[timm]" "$peft"
  torchvision_hook
  "$VPY" -c "import serial_lora_core, timm_plugin, peft"
}

install_all_extras() {
  local extras
  extras=$("$VPY" -c "import tomllib; print(','.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']))")
  "${PIP[@]}" install -c constraints.txt -e ".[$extras]"
  torchvision_hook
  "$VPY" -c "import serial_lora_core, timm_plugin, diffusers_loader, pytest"
}

component base install_base
if [ "$TARGET" = test ]; then
  component all-extras install_all_extras
  # ComfyUI itself, its runtime, the web frontend and Chromium, for the ComfyUI tests (stamped there).
  bash scripts/setup_comfyui.sh "$VENV" "${SERIAL_LORA_COMFYUI:-$ROOT/third_party/ComfyUI}"
fi
echo "serial-lora environment ready for '$TARGET': $VENV"
