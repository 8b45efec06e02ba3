#!/usr/bin/env bash
# Set up everything the tests need (every extra, test tools, ComfyUI, Chromium; idempotent), then run
# the test suite offline on the CPU. Arguments go to pytest (e.g. tests/test_core_merge.py -k unmerge).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# The tests' models are tiny: one thread each is faster than threads waiting on each other.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "${SERIAL_LORA_VENV:-.venv}/bin/python" -m pytest -q "$@"
