"""Scaling plots (PNG) and markdown tables from the results of vit.py and sd3.py.

    python benchmarks/plot.py RESULTS_DIR [PLOT_DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODES = ("floor", "serial", "peft")
STYLE = {"floor": dict(color="gray", linestyle="--"), "serial": dict(color="tab:blue"),
         "peft": dict(color="tab:orange")}


def _points(sweep: dict) -> list[tuple[int, dict]]:
    return sorted((int(k), v) for k, v in sweep.items() if k.isdigit())


def scaling(results: dict, name: str, plot_dir: Path) -> list[str]:
    """One 2x2 figure (step time and peak memory against rank and against image size) and table rows."""
    rows = []
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for col, (key, xlabel) in enumerate((("rank_sweep", "rank"), ("token_sweep", "image size (px)"))):
        points = _points(results.get(key, {}))
        if not points:
            continue
        for mode in MODES:
            xs = [x for x, p in points if mode in p]
            if not xs:
                continue
            ms = [p[mode]["median_ms"] for x, p in points if mode in p]
            gib = [p[mode]["peak_gib"] for x, p in points if mode in p]
            axes[0][col].plot(xs, ms, marker="o", label=mode, **STYLE[mode])
            axes[1][col].plot(xs, gib, marker="o", label=mode, **STYLE[mode])
        main_floor = results.get("train", {}).get("floor") if key == "rank_sweep" else None
        if main_floor:  # the rank sweep runs at the main training configuration: its floor is the floor
            axes[0][col].axhline(main_floor["median_ms"], label="floor", **STYLE["floor"])
            axes[1][col].axhline(main_floor["peak_gib"], label="floor", **STYLE["floor"])
        for x, p in points:
            floor = p.get("floor", main_floor or {}).get("median_ms")
            for mode in MODES:
                if mode not in p:
                    continue
                over = f"{p[mode]['median_ms'] / floor:.3f}" if floor else "-"
                rows.append(f"| {name} | {xlabel.split()[0]} | {x} | {mode} | {p[mode]['median_ms']:.1f} | {over} | "
                            f"{p[mode]['host_issue_ms']:.1f} | {p[mode]['peak_gib']:.2f} |")
        axes[0][col].set(xlabel=xlabel, ylabel="training step, median (ms)")
        axes[1][col].set(xlabel=xlabel, ylabel="peak memory (GiB)")
        for ax in (axes[0][col], axes[1][col]):
            ax.grid(alpha=0.3)
            ax.legend()
            if key == "rank_sweep":
                ax.set_xscale("log", base=2)
                ax.set_xticks([x for x, _ in points], [str(x) for x, _ in points])
    extra = results.get("token_sweep", {})
    fig.suptitle(f"{name}: Serial LoRA vs PEFT LoRA vs frozen floor; {results['env'].get('device')}, "
                 f"torch {results['env'].get('torch')}\nrank sweep at batch {results.get('batch')}, "
                 f"token sweep at rank {extra.get('rank')}, batch {extra.get('batch')}")
    fig.tight_layout()
    plot_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot_dir / f"{name}_scaling.png", dpi=100)
    plt.close(fig)
    return rows


def main() -> None:
    results_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
    plot_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else results_dir
    rows = ["| model | sweep | x | variant | step ms (median) | / floor | host issue ms | peak GiB |",
            "|---|---|---|---|---|---|---|---|"]
    for name in ("vit", "sd3"):
        path = results_dir / f"{name}.json"
        if path.exists():
            rows += scaling(json.loads(path.read_text()), name, plot_dir)
    (plot_dir / "scaling_table.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
