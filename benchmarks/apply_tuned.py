"""Write the best launch parameters of a `triton_tune.py` run into serial_lora_core/triton_adapter.py.

    python benchmarks/apply_tuned.py RESULTS/triton_tune.json
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

KERNEL = Path(__file__).resolve().parents[1] / "serial_lora_core" / "triton_adapter.py"


def main() -> None:
    best = json.loads(Path(sys.argv[1]).read_text())["overall_best"]
    text = KERNEL.read_text()
    for key, value in best.items():
        text, found = re.subn(rf"^{key.upper()} = \d+$", f"{key.upper()} = {value}", text, flags=re.M)
        if found != 1:
            raise SystemExit(f"{KERNEL}: no line '{key.upper()} = <int>' to update")
    KERNEL.write_text(text)
    print("applied", best)


if __name__ == "__main__":
    main()
