#!/usr/bin/env bash
# Set up only what the quick start needs (CPU torch, the library, timm, peft; idempotent), then run it:
# fine-tune a ViT with Serial LoRA next to PEFT's LoRA, judged on held-out data, save the adapter,
# reload it through timm.create_model and merge it. Arguments go to examples/finetune_vit.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh quickstart
exec "${SERIAL_LORA_VENV:-.venv}/bin/python" examples/finetune_vit.py "$@"
