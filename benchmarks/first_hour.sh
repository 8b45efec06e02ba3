#!/usr/bin/env bash
# Times the README's two commands as a new user meets them: on a fresh clone, with an empty pip cache.
#   bash benchmarks/first_hour.sh                 # quick start: set-up cold, set-up warm, the job
#   bash benchmarks/first_hour.sh quickstart test # + the test set-up, cold and warm
#   options: --suite (also run the whole test suite, ~20 min), --worktree (copy the working tree,
#            uncommitted changes included, instead of cloning the last commit), --keep (keep the clone)
# Prints one line per step, wall time and CPU time (user + system of every process it started; the CPU
# time does not depend on what else the machine runs), and writes outputs/first_hour.json here.
# What it cannot make cold: packages apt installed before (Chromium), and the package index's speed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
targets=() suite=0 worktree=0 keep=0
for arg in "$@"; do
  case "$arg" in
    quickstart|test) targets+=("$arg") ;;
    --suite) suite=1 ;;
    --worktree) worktree=1 ;;
    --keep) keep=1 ;;
    *) echo "usage: bash benchmarks/first_hour.sh [quickstart] [test] [--suite] [--worktree] [--keep] (got '$arg')" >&2
       exit 2 ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(quickstart)

work=$(mktemp -d "${TMPDIR:-/tmp}/serial-lora-first-hour.XXXXXX")
clone="$work/serial-lora"
if [ "$keep" = 0 ]; then trap 'rm -rf "$work"' EXIT; fi
if [ "$worktree" = 1 ]; then
  mkdir -p "$clone"
  git ls-files -z --cached --others --exclude-standard | (cd "$ROOT" && xargs -0 tar -cf - --ignore-failed-read 2>/dev/null) \
    | tar -xf - -C "$clone"
else
  git clone -q "$ROOT" "$clone"
fi
export PIP_CACHE_DIR="$work/pip-cache"  # a new user's empty cache
results="$work/results.jsonl"

# step NAME COMMAND...: runs COMMAND in the clone, prints and records wall and CPU seconds.
step() {
  local name=$1 t
  shift
  TIMEFORMAT='%R %U %S'
  t=$( { time (cd "$clone" && "$@" >"$work/$name.log" 2>&1) ; } 2>&1 ) || {
    echo "$name failed; its log:" >&2; tail -30 "$work/$name.log" >&2; exit 1; }
  read -r wall user sys <<<"$t"
  cpu=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.1f", u + s }')
  printf '%-22s wall %7.1f s   CPU %7.1f s\n' "$name" "$wall" "$cpu"
  echo "{\"step\": \"$name\", \"wall_s\": $wall, \"cpu_s\": $cpu}" >>"$results"
}

echo "fresh clone in $clone ($(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg))"
for target in "${targets[@]}"; do
  step "$target-setup-cold" bash scripts/setup.sh "$target"
  step "$target-setup-warm" bash scripts/setup.sh "$target"
  if [ "$target" = quickstart ]; then
    step "quickstart-job" bash scripts/quickstart.sh
    grep -A3 "^Held-out accuracy" "$work/quickstart-job.log" | head -4 || true
  elif [ "$suite" = 1 ]; then
    step "test-suite" bash scripts/test.sh
  fi
done
mkdir -p outputs
python3 -c "import json, sys; print(json.dumps([json.loads(l) for l in open(sys.argv[1])], indent=2))" "$results" \
  >outputs/first_hour.json
echo "written: outputs/first_hour.json"
