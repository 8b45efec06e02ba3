"""The paper's Fig. 3 for the proxy's adapters: singular values of the effective q, k, v weights per block, base vs
Serial LoRA vs PEFT LoRA on the same base, through `serial_lora_train.analyze` (what `serial-lora analyze` runs).

    python -m experiments.spectrum --backbone experiments/results/proxy_backbone/backbone.safetensors \\
        --adapters experiments/results/proxy_adapters --out experiments/results/spectrum

`--adapters` is the folder `experiments.proxy --spectrum-dir` writes: `serial.safetensors` + PEFT's `lora/`, and
`serial_plus.safetensors` + `lora_plus/` (the LoRA+ pair). Each pair gets a sub-folder with spectra.png and
spectra.csv. The models are built here by `pretrain_proxy.build_backbone` (the proxy's shrunken ViT, its own
loader), not by timm's `pretrained_cfg_overlay`: timm 1.0.29 sends a local file for this architecture to its JAX
`.npz` loader. With timm 1.0.31 `serial-lora analyze --pretrained-file backbone.safetensors --model-kwargs ...`
gives the same figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

PAIRS = {"serial_vs_lora": ("serial.safetensors", "lora"), "serial_plus_vs_lora_plus": ("serial_plus.safetensors", "lora_plus")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from peft import PeftModel

    from experiments.common import write_bytes
    from experiments.pretrain_proxy import build_backbone
    from serial_lora_core import load_serial_lora
    from serial_lora_train.analyze import analyze

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", required=True, help="backbone.safetensors of experiments.pretrain_proxy")
    parser.add_argument("--adapters", required=True, help="the folder of experiments.proxy --spectrum-dir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-classes", type=int, default=10, help="classes of the adapters' task head")
    parser.add_argument("--smoke", action="store_true", help="the backbone is pretrain_proxy --smoke's tiny ViT")
    args = parser.parse_args(argv)
    adapters, out = Path(args.adapters), Path(args.out)
    results = {}
    for name, (serial_file, lora_dir) in PAIRS.items():
        if not (adapters / serial_file).is_file() or not (adapters / lora_dir / "adapter_config.json").is_file():
            raise ValueError(f"{adapters} lacks {serial_file} or {lora_dir}/adapter_config.json; run experiments.proxy "
                             "with --spectrum-dir first")
        model = build_backbone(args.num_classes, args.smoke, args.backbone)
        load_serial_lora(model, adapters / serial_file)
        compare = PeftModel.from_pretrained(build_backbone(args.num_classes, args.smoke, args.backbone), str(adapters / lora_dir))
        result = analyze(model, out / name, compare=compare,
                         title=f"proxy ViT: {serial_file} vs PEFT {lora_dir} (same base)")
        results[name] = {"csv": str(result.csv_path), "png": str(result.png_path), "rows": result.rows}
    write_bytes(out / "spectrum.json", (json.dumps(results, indent=1) + "\n").encode())
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
