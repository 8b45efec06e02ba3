"""Shared helpers for the GPU benchmarks: timing (CUDA events, median after warm-up), peak memory, reports.

`compare` is the one used for every side-by-side number: it builds all variants first, then times them
interleaved (one step of each per round, rotating the order), so clock and thermal drift hit every
variant alike, and measures each variant's peak memory as if it were alone on the device.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

GIB = 2**30


def benchmark_parser(name: str, smoke: str, iters: int = 20, description: str | None = None) -> argparse.ArgumentParser:
    """The options every benchmark shares: --out (results folder), --smoke (`smoke` says what it runs
    instead), --iters (timed steps) and --name (results file name, default `name`)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--smoke", action="store_true", help=smoke)
    parser.add_argument("--iters", type=int, default=iters)
    parser.add_argument("--name", default=name, help="results file name (without .json)")
    return parser


def section_args(name: str, smoke: str, description: str | None, sections: str) -> tuple[argparse.Namespace, list[str], int, int]:
    """Parsed `benchmark_parser` options plus --sections (comma list, default `sections`): the options,
    the sections to run, and (timed steps, warm-up steps): (--iters, 3), or (2, 1) with --smoke."""
    parser = benchmark_parser(name, smoke, description=description)
    parser.add_argument("--sections", default=sections)
    args = parser.parse_args()
    return args, args.sections.split(","), *((2, 1) if args.smoke else (args.iters, 3))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cuda() -> bool:
    return torch.cuda.is_available()


def environment() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "command": " ".join(sys.argv)}
    if cuda():
        info["device"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = "cpu (smoke run)"
    for name in ("timm", "diffusers", "peft"):
        module = sys.modules.get(name)
        if module is not None:
            info[name] = getattr(module, "__version__", "?")
    return info


def without_triton_kernel(model: torch.nn.Module) -> None:
    """Make every Serial LoRA adapter of `model` take the core's PyTorch path (the before of fix 3)."""
    from serial_lora_core.adapter import StreamAdapter

    for module in model.modules():
        if isinstance(module, StreamAdapter):
            module.use_triton = False


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def allocated() -> int:
    return torch.cuda.memory_allocated() if cuda() else 0


def free() -> None:
    gc.collect()
    if cuda():
        torch.cuda.empty_cache()


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(device milliseconds, host milliseconds spent issuing the work) of one call."""
    if cuda():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        host = (time.perf_counter() - t0) * 1e3
        end.synchronize()
        return start.elapsed_time(end), host
    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    return ms, ms


def _peak_during(fn: Callable[[], object]) -> int:
    """Bytes allocated at the peak of one call, above what was allocated when it started."""
    if not cuda():
        fn()
        return 0
    sync()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() - before


def summary(times: list[float], hosts: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "host_issue_ms": statistics.median(hosts), "iters": len(times)}


def compare(builders: dict[str, Callable[[], Callable[[], object]]], iters: int = 20, warmup: int = 3) -> dict:
    """Build every variant, then time them interleaved; medians, ratios to the first variant, peak memory.

    A builder returns the step function. Peak memory per variant is what that variant alone would show
    in `torch.cuda.max_memory_allocated()`: its resident bytes (model, inputs, optimizer state, measured
    as the allocation growth over its build and first step) plus the transient peak of one step.
    """
    steps, resident = {}, {}
    for name, build in builders.items():
        before = allocated()
        steps[name] = build()
        steps[name]()  # first step: creates optimizer state (and compiles, when compiled)
        sync()
        resident[name] = allocated() - before
    for _ in range(max(warmup - 1, 0)):
        for step in steps.values():
            step()
    sync()
    transient = {name: _peak_during(step) for name, step in steps.items()}
    names = list(steps)
    times = {name: [] for name in names}
    hosts = {name: [] for name in names}
    for i in range(iters):
        for name in names[i % len(names):] + names[: i % len(names)]:
            ms, host = _timed(steps[name])
            times[name].append(ms)
            hosts[name].append(host)
    results = {}
    for name in names:
        results[name] = summary(times[name], hosts[name])
        results[name]["peak_gib"] = (resident[name] + transient[name]) / GIB if cuda() else float("nan")
        results[name]["resident_gib"] = resident[name] / GIB if cuda() else float("nan")
    return results


def measure(fn: Callable[[], object], iters: int = 20, warmup: int = 3) -> dict:
    """Median / min / max milliseconds of `fn` over `iters` runs after `warmup`, and the peak memory."""
    for _ in range(warmup):
        fn()
    sync()
    if cuda():
        torch.cuda.reset_peak_memory_stats()
    times, hosts = [], []
    for _ in range(iters):
        ms, host = _timed(fn)
        times.append(ms)
        hosts.append(host)
    result = summary(times, hosts)
    result["peak_gib"] = torch.cuda.max_memory_allocated() / GIB if cuda() else float("nan")
    return result


def ratios(results: dict, reference: str, others: list[str]) -> dict:
    """Median time of each of `others` over `reference`'s."""
    base = results[reference]["median_ms"]
    return {f"{name}_over_{reference}": results[name]["median_ms"] / base for name in others}


def training_ratios(results: dict, floor: str = "floor") -> dict:
    """The issue's three training targets: Serial/floor, Serial's overhead over PEFT's, peak memory."""
    f = results[floor]["median_ms"]
    serial, peft = results["serial"], results["peft"]
    out = {
        "serial_over_floor": serial["median_ms"] / f,
        "peft_over_floor": peft["median_ms"] / f,
        "serial_overhead_over_peft_overhead": (serial["median_ms"] - f) / max(peft["median_ms"] - f, 1e-9),
    }
    if cuda():
        out["serial_peak_over_peft_peak"] = serial["peak_gib"] / peft["peak_gib"]
    return out


def write(results: dict, name: str, out_dir: str | Path) -> Path:
    path = Path(out_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    return path


def section(title: str) -> float:
    print(f"== {title}", flush=True)
    return time.perf_counter()


def done(title: str, t0: float, results: dict | None = None) -> None:
    line = f"   {title}: {time.perf_counter() - t0:.1f}s"
    if results:
        medians = {k: round(v["median_ms"], 2) for k, v in results.items() if isinstance(v, dict) and "median_ms" in v}
        if medians:
            line += f" medians {medians}"
        extra = results.get("ratios")
        if extra:
            line += f" ratios { {k: round(v, 3) for k, v in extra.items()} }"
    print(line, flush=True)


def record(results: dict, key: str, title: str, compute: Callable[[], dict], name: str, out_dir: str | Path) -> dict:
    """Run one benchmark section: store `results[key]`, rewrite the JSON at once (a later section that
    crashes or times out keeps what came before), print its timing, free GPU memory."""
    t0 = section(title)
    results[key] = compute()
    write(results, name, out_dir)
    done(title, t0, results[key])
    free()
    return results[key]


def training_comparison(trainer_of: Callable[[str, dict], Callable[[], object]], iters: int, warmup: int) -> dict:
    """floor, floor_blocks, Serial and PEFT training steps timed in turn, with trainable-parameter counts
    (filled in by `trainer_of(mode, info)`) and the ratios against both floors."""
    info: dict = {}
    train = compare({m: trainer_of(m, info) for m in ("floor", "floor_blocks", "serial", "peft")}, iters, warmup)
    train["trainable_parameters"] = info
    train["ratios"] = training_ratios(train)
    train["ratios_vs_floor_blocks"] = training_ratios(train, "floor_blocks")
    return train
