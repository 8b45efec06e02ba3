"""Make the best launch parameters of a `triton_tune.py` run the kernel's defaults.

    python benchmarks/apply_tuned.py RESULTS/triton_tune.json

Writes serial_lora_core/triton_tuned.json (package data that serial_lora_core/triton_adapter.py reads);
no source file is edited.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from serial_lora_core.format import atomic_write
from serial_lora_core.triton_adapter import TUNED_FILE, load_launch_parameters

TABLE = Path(__file__).resolve().parents[1] / "serial_lora_core" / TUNED_FILE


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    results = Path(sys.argv[1])
    best = json.loads(results.read_text()).get("overall_best")
    text = json.dumps(best, indent=2) + "\n"
    try:
        load_launch_parameters(text, f"{results} (overall_best)")
    except ValueError as error:
        raise SystemExit(str(error)) from None
    atomic_write(TABLE, lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {TABLE}: {best}")


if __name__ == "__main__":
    main()
