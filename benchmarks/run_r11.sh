#!/usr/bin/env bash
# Run 11 (trainers, CLIP/SAM): train-classifier vs the bare step, DDP 1 vs 2 GPUs, CLIP/SAM step vs floor and PEFT,
# multi-GPU trainer tests. On the 2-GPU machine, from the repository root, diffusers wheels in .whl/ (BENCHMARKS.md).
set -uo pipefail
OUT=${OUT:-benchmarks/results}
export PYTHONUNBUFFERED=1
if ! python3 -c "import diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
launch=(accelerate launch --num_machines 1 --mixed_precision bf16 --dynamo_backend no)
cd benchmarks
t0=$(date +%s); python3 clip_sam.py --out "$OUT" --iters 15 2>&1 | grep "train:"; echo "== clip_sam $(( $(date +%s)-t0 )) s"
t0=$(date +%s); python3 train_classifier.py --out "$OUT" --iters 20 --jpeg-images 1024 2>&1 | tail -12; echo "== train_classifier $(( $(date +%s)-t0 )) s"
t0=$(date +%s)
"${launch[@]}" --num_processes 1 train_classifier_ddp.py --out "$OUT" --iters 20 2>&1 | grep '"processes"'
"${launch[@]}" --num_processes 2 --multi_gpu train_classifier_ddp.py --out "$OUT" --iters 20 2>&1 | grep '"processes"'
rm -rf "$OUT"/*_scratch; echo "== ddp $(( $(date +%s)-t0 )) s"
cd ..
python3 -m pytest -q -p no:cacheprovider -m multigpu tests/test_train_classifier.py 2>&1 | tail -4
