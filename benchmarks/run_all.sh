#!/usr/bin/env bash
# Every benchmark of BENCHMARKS.md, on the GPU machine, from the repository root:
#   bash benchmarks/run_all.sh [gpu-tests|tune|vit|vit-infer|sd3|sd3-infer|profile|all ...]     (results under $OUT, else benchmarks/results)
# One 10-minute device call fits `vit` (~5 min, torch.compile included); another `sd3 profile`; `gpu-tests tune` take ~2 min.
# diffusers is not on the GPU image: carry pure-Python wheels in .whl/ (see BENCHMARKS.md).
# The scaling plots and the table are made afterwards, anywhere: python benchmarks/plot.py RESULTS_DIR
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-}
python3 -c "import torch, timm, peft, diffusers; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), 'timm', timm.__version__, 'peft', peft.__version__, 'diffusers', diffusers.__version__)"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader || true
parts=${*:-all}
[ "$parts" = all ] && parts="gpu-tests tune vit sd3 profile"
status=0
for part in $parts; do
  t0=$(date +%s)
  case $part in
    vit) python3 benchmarks/vit.py --out "$OUT" || status=1 ;;
    sd3) python3 benchmarks/sd3.py --out "$OUT" || status=1 ;;
    sd3-infer) python3 benchmarks/sd3.py --out "$OUT" --sections infer --name sd3_infer || status=1 ;;
    vit-infer) python3 benchmarks/vit.py --out "$OUT" --sections infer --name vit_infer || status=1 ;;
    profile) python3 benchmarks/profile_adapter.py --out "$OUT" || status=1 ;;
    tune) python3 benchmarks/triton_tune.py --out "$OUT" || status=1 ;;
    gpu-tests) python3 -m pytest -q -m gpu tests/test_gpu_triton_adapter.py || status=1 ;;
    *) echo "unknown part $part (gpu-tests, tune, vit, vit-infer, sd3, sd3-infer, profile, all)"; exit 2 ;;
  esac
  echo "== $part took $(( $(date +%s) - t0 )) s"
done
exit $status
