"""Scaling plots (PNG) and a markdown table from benchmarks/results/{vit,sd3}.json.

    python benchmarks/plot.py benchmarks/results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def sweep_plot(results: dict, name: str, out: Path) -> list[str]:
    rows = []
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for col, (key, xlabel) in enumerate((("rank_sweep", "rank"), ("token_sweep", "image size (px)"))):
        sweep = results.get(key)
        if not sweep:
            continue
        for mode, points in sweep.items():
            if not isinstance(points, dict):
                continue
            xs = sorted(points, key=int)
            axes[0][col].plot([int(x) for x in xs], [points[x]["median_ms"] for x in xs], marker="o", label=mode)
            axes[1][col].plot([int(x) for x in xs], [points[x]["peak_gib"] for x in xs], marker="o", label=mode)
            for x in xs:
                rows.append(f"| {name} | {key} | {mode} | {x} | {points[x]['median_ms']:.1f} | {points[x]['peak_gib']:.2f} |")
        axes[0][col].set(xlabel=xlabel, ylabel="train step (ms, median)", title=f"{name}: {key}")
        axes[1][col].set(xlabel=xlabel, ylabel="peak memory (GiB)")
        for ax in (axes[0][col], axes[1][col]):
            ax.grid(alpha=0.3)
            ax.legend()
            if key == "rank_sweep":
                ax.set_xscale("log", base=2)
    fig.suptitle(f"{name}: Serial LoRA vs PEFT LoRA ({results['env'].get('device')})")
    fig.tight_layout()
    fig.savefig(out / f"{name}_scaling.png", dpi=110)
    plt.close(fig)
    return rows


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
    rows = ["| model | sweep | mode | x | step ms | peak GiB |", "|---|---|---|---|---|---|"]
    for name in ("vit", "sd3"):
        path = out / f"{name}.json"
        if path.exists():
            rows += sweep_plot(json.loads(path.read_text()), name, out)
    (out / "scaling_table.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
