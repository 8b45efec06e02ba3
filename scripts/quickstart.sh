#!/usr/bin/env bash
# Set up (idempotent) and run the main job on its embedded default: fine-tune a ViT with Serial LoRA
# next to PEFT's LoRA, save the adapter, reload it through timm.create_model and merge it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/finetune_vit.py "$@"
