"""Launch parameters of the core's Triton inference kernel (serial_lora_core/triton_adapter.py).

For the ViT-B/16 (b256, 224 px, r32) and SD3-medium (b2, 1024 px, r64) adapted inputs, times one
adapted stream side by side: the cast the base model pays anyway (float32 -> bfloat16), the core's
PyTorch path, and the kernel at each launch configuration of CONFIGS. The defaults in
serial_lora_core/triton_tuned.json are the best of this sweep over both shapes (written there by
apply_tuned.py).

    python benchmarks/triton_tune.py --out OUT [--iters N]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
from common import compare, device, done, environment, section, without_triton_kernel, write

from serial_lora_core import triton_adapter
from serial_lora_core.adapter import StreamAdapter

SHAPES = {"vit_b16_b256_r32": (256 * 197, 768, 32), "sd3_medium_1024px_r64": (2 * 4096, 1536, 64)}
# (block_m, block_d, num_warps, programs_per_sm, num_stages, stage_in_y); programs_per_sm 0 = one program
# per row block. Earlier sweeps (history/r8_triton_tune_*.json) ruled out block_m 64/128, block_d 64,
# programs_per_sm 1-2 and a one-pass variant holding whole rows and both factors on chip (x13 to x40
# the cast: register spills).
CONFIGS = list(itertools.product((16, 32), (128, 256), (4, 8), (0, 4, 8, 16), (2, 3), (0, 1)))
CONFIG_KEYS = triton_adapter.LAUNCH_KEYS  # the order of each CONFIGS tuple; apply_tuned.py writes these keys


def tune(rows: int, d: int, r: int, iters: int) -> dict:
    adapter = StreamAdapter(d, r, scaling=2.0).to(device()).eval()
    torch.nn.init.normal_(adapter.up.weight, std=0.02)
    x = torch.randn(rows, d, device=device())
    down, up = adapter.down.weight, adapter.up.weight
    plain = StreamAdapter(d, r, scaling=2.0).to(device()).eval()
    plain.load_state_dict(adapter.state_dict())
    without_triton_kernel(plain)

    def cast():
        return lambda: x.to(torch.bfloat16)

    def pytorch():
        def run():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                plain(x)

        return run

    def kernel(block_m, block_d, warps, programs, stages, staged):
        def run():
            triton_adapter.adapted_input(x, down, up, 2.0, torch.bfloat16, block_m=block_m, block_d=block_d,
                                         num_warps=warps, programs_per_sm=programs, num_stages=stages,
                                         stage_in_y=bool(staged))

        return run

    variants = {"cast_only": cast, "pytorch_path": pytorch, "default": lambda: lambda: triton_adapter.adapted_input(
        x, down, up, 2.0, torch.bfloat16)}
    failed = {}
    for config in CONFIGS:
        name = config_name(*config)
        try:  # compile and launch once: configs beyond the chip's shared memory or registers drop out
            kernel(*config)()
            variants[name] = lambda config=config: kernel(*config)
        except (triton.runtime.errors.OutOfResources, triton.runtime.errors.PTXASError) as error:
            failed[name] = str(error)
    out = compare(variants, iters, 3)
    out["failed"] = failed
    floor = out["cast_only"]["median_ms"]
    out["over_cast"] = {name: out[name]["median_ms"] / floor for name in variants}
    out["best"] = min((n for n in variants if n.startswith("m")), key=lambda n: out[n]["median_ms"])
    return out


def config_name(block_m: int, block_d: int, warps: int, programs: int, stages: int, staged: int) -> str:
    return f"m{block_m}_d{block_d}_w{warps}_p{programs}_s{stages}_y{staged}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    results = {"env": environment(), "configs": CONFIGS}
    for name, (rows, d, r) in SHAPES.items():
        t0 = section(f"triton kernel launch sweep, {name}")
        results[name] = tune(rows, d, r, args.iters)
        write(results, "triton_tune", args.out)
        best = results[name]["best"]
        done(name, t0)
        over = results[name]["over_cast"]
        print(f"   best {best}: {over[best]:.3f}x the cast; default {over['default']:.3f}x; pytorch path "
              f"{over['pytorch_path']:.3f}x; top 6: {sorted(over.items(), key=lambda item: item[1])[:6]}", flush=True)
    # One ranking over both shapes: the sum of each config's time relative to that shape's best.
    configs = {config_name(*c): c for c in CONFIGS if all(config_name(*c) in results[s] for s in SHAPES)}
    score = {name: sum(results[s][name]["median_ms"] / results[s][results[s]["best"]]["median_ms"] for s in SHAPES)
             for name in configs}
    ranking = sorted(score.items(), key=lambda item: item[1])
    results["ranking"], results["overall_best"] = ranking[:10], dict(zip(CONFIG_KEYS, configs[ranking[0][0]]))
    write(results, "triton_tune", args.out)
    print("   overall ranking:", [(n, round(v, 3)) for n, v in ranking[:6]], flush=True)
    print("   overall best:", results["overall_best"], flush=True)


if __name__ == "__main__":
    main()
