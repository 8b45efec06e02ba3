#!/usr/bin/env bash
# The offline proxy end to end on one GPU machine, as recorded in EXPERIMENTS.md:
#   bash experiments/run_proxy.sh [RESULTS_DIR]
# 1. pre-train the small ViT on procedural fractals; 2. the tuned few-shot search (all methods, both tasks);
# 3. the four adapters of the spectrum figure and the figure (Fig. 3). Knobs: PYTHON, WORKERS (processes sharing the
# GPU; start CUDA MPS first), BUDGET (seconds for the search; default: no limit, about 6.5 min on one H200 with 14
# workers), SEED (pre-training seed, 0 by default: another seed gives another backbone), SMOKE=1 (tiny random models,
# CPU, seconds: checks the pipeline, measures nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-experiments/results}
PY=${PYTHON:-python3}
WORKERS=${WORKERS:-14}
BUDGET=${BUDGET:-inf}
SEED=${SEED:-0}
SMOKE_FLAG=()
[ "${SMOKE:-0}" = 1 ] && SMOKE_FLAG=(--smoke)
mkdir -p "$RESULTS"
"$PY" -m experiments.pretrain_proxy --out "$RESULTS/proxy_backbone" --classes 400 --per-class 100 --epochs 40 \
  --data-workers "$WORKERS" --seed "$SEED" "${SMOKE_FLAG[@]}"
"$PY" -m experiments.proxy --backbone "$RESULTS/proxy_backbone/backbone.safetensors" --out "$RESULTS" \
  --workers "$WORKERS" --time-budget "$BUDGET" --spectrum-dir "$RESULTS/proxy_adapters" "${SMOKE_FLAG[@]}"
"$PY" -m experiments.spectrum --backbone "$RESULTS/proxy_backbone/backbone.safetensors" \
  --adapters "$RESULTS/proxy_adapters" --out "$RESULTS/spectrum" "${SMOKE_FLAG[@]}"
