"""experiments/: the procedural datasets, the proxy's sampler and search, and every script end to end (smoke)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from experiments import procedural, proxy
from experiments.proxy import Job, at_edge, extension_jobs, few_shot_split, select, summarize


# ---------------------------------------------------------------------------------------- datasets

DATASETS = {
    "fractals": lambda seed: procedural.fractal_dataset(num_classes=6, per_class=5, size=16, seed=seed),
    "shapes": lambda seed: procedural.shapes_dataset(per_class=4, size=16, seed=seed),
}


@pytest.mark.parametrize("name", DATASETS)
def test_procedural_is_deterministic_and_balanced(name):
    images, labels = DATASETS[name](3)
    again, labels_again = DATASETS[name](3)
    other, _ = DATASETS[name](4)
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 16, 16)
    assert images.numpy().tobytes() == again.numpy().tobytes() and torch.equal(labels, labels_again)
    assert not torch.equal(images, other)  # the seed matters
    counts = torch.bincount(labels)
    assert counts.min() == counts.max() and len(counts) == (6 if name == "fractals" else len(procedural.SHAPES))
    # Not blank: every image has some structure.
    assert (images.float().flatten(1).std(1) > 1).all()


def test_fractal_bytes_do_not_depend_on_worker_count():
    serial, _ = procedural.fractal_dataset(num_classes=3, per_class=200, size=16, seed=1)  # > one 512-image chunk
    parallel, _ = procedural.fractal_dataset(num_classes=3, per_class=200, size=16, seed=1, workers=2)
    assert torch.equal(serial, parallel)


@pytest.mark.parametrize("bad", [{"per_class": 0}, {"size": 4}, {"num_classes": 0}])
def test_procedural_rejects_bad_arguments(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        procedural.fractal_dataset(**{"num_classes": 2, "per_class": 2, **bad})


def test_digits_are_the_bundled_real_images():
    images, labels = procedural.digits_dataset(size=32)
    assert images.shape == (1797, 3, 32, 32) and images.dtype == torch.uint8
    assert sorted(labels.unique().tolist()) == list(range(10))


# --------------------------------------------------------------------------------- few-shot sampler


@pytest.mark.parametrize("shots", [1, 4, 16])
@pytest.mark.parametrize("seed", [0, 3])
def test_few_shot_split_never_puts_a_validation_image_in_the_training_shots(shots, seed):
    from serial_lora_train.data import few_shot_indices

    labels = torch.arange(10).repeat_interleave(40)[torch.randperm(400, generator=torch.Generator().manual_seed(seed))]
    train, val = few_shot_split(labels, shots, seed)
    assert not set(train) & set(val)
    assert train == few_shot_indices(labels.tolist(), shots, seed)  # exactly the trainers' N-shot pick
    for indices in (train, val):
        assert torch.bincount(labels[indices], minlength=10).tolist() == [shots] * 10
    assert few_shot_split(labels, shots, seed) == (train, val)  # reproducible
    assert few_shot_split(labels, shots, seed + 1) != (train, val)


def test_few_shot_split_names_a_class_that_is_too_small():
    labels = torch.tensor([0] * 10 + [1] * 3)
    with pytest.raises(ValueError, match="has only"):
        few_shot_split(labels, 2, 0)


def test_task_pools_are_disjoint_from_the_test_pool():
    data = proxy.load_task("digits")
    pool = {bytes(x.numpy()) for x in data["pool_x"]}
    assert len(data["test_y"]) > 800 and not any(bytes(x.numpy()) in pool for x in data["test_x"][:200])


# ----------------------------------------------------------------------------- the hyper-parameter search


def _records(val_by_lr: dict[int, float], method: str = "Serial", seeds=(0, 1)) -> list[dict]:
    return [{"task": "t", "shots": 1, "method": method, "seed": s, "lr_exp": e, "ratio_exp": 0,
             "lr": proxy.PAPER_LR * proxy.LR_STEP ** e, "ratio": None, "val_top1": v, "test_top1": v / 2,
             "adapter_parameters": 1, "trainable_parameters": 2, "rank": 4} for e, v in val_by_lr.items() for s in seeds]


@pytest.mark.parametrize("val_by_lr, best, edge", [
    ({-1: 0.2, 0: 0.5, 1: 0.3}, (0, 0), {}),
    ({-1: 0.2, 0: 0.3, 1: 0.5}, (1, 0), {"lr": 1}),
    ({-1: 0.6, 0: 0.3, 1: 0.5}, (-1, 0), {"lr": -1}),
    ({-1: 0.5, 0: 0.5, 1: 0.2}, (0, 0), {}),  # a tie goes to the paper's value
])
def test_selection_uses_validation_and_flags_edges(val_by_lr, best, edge):
    configs = proxy._by_cell(_records(val_by_lr))[("t", 1, "Serial")]
    assert select(configs) == best
    assert at_edge(configs, best) == edge


def test_grid_is_widened_where_the_best_value_sits_at_its_edge():
    records = _records({-1: 0.2, 0: 0.3, 1: 0.5})
    new = extension_jobs(records, seeds=[0, 1], limit=5)
    assert {(j.lr_exp, j.seed) for j in new} == {(2, 0), (2, 1)}
    assert extension_jobs(_records({-1: 0.2, 0: 0.5, 1: 0.3}), seeds=[0, 1], limit=5) == []
    assert extension_jobs(records, seeds=[0, 1], limit=1) == []  # never beyond the limit


def test_paired_differences_are_per_seed():
    records = _records({0: 0.5}, "Serial") + _records({0: 0.4}, "LoRA")
    for r in records:
        r["test_top1"] = {("Serial", 0): 0.7, ("Serial", 1): 0.6, ("LoRA", 0): 0.5, ("LoRA", 1): 0.65}[(r["method"], r["seed"])]
    pair = next(p for p in summarize(records)["paired"] if p["pair"] == "Serial - LoRA" and p["setting"] == "default")
    assert pair["per_seed"] == pytest.approx({0: 0.2, 1: -0.05})
    assert pair["mean"] == pytest.approx(0.075) and (pair["wins"], pair["losses"]) == (1, 1)
    assert pair["ci95"] > abs(pair["mean"])  # two seeds that disagree: the interval covers 0


def test_job_learning_rates_follow_the_grid():
    assert Job("t", 1, 0, "Serial").lr == pytest.approx(2e-4) and Job("t", 1, 0, "Serial").ratio is None
    assert Job("t", 1, 0, "LoRA+", lr_exp=2, ratio_exp=-1).lr == pytest.approx(2e-3)
    assert Job("t", 1, 0, "LoRA+", ratio_exp=-1).ratio == pytest.approx(5.0)


# ------------------------------------------------------------------------------------ scripts, smoke mode


@pytest.fixture(scope="module")
def smoke_backbone(tmp_path_factory) -> Path:
    """The folder `pretrain_proxy --smoke` writes (tiny ViT, 10 fractal classes, 2 steps)."""
    from experiments.pretrain_proxy import main

    out = tmp_path_factory.mktemp("backbone")
    assert main(["--smoke", "--out", str(out)])["smoke"]
    return out


def test_pretrain_proxy_smoke_writes_a_loadable_backbone(smoke_backbone):
    from safetensors.torch import load_file

    from experiments.pretrain_proxy import build_backbone

    assert json.loads((smoke_backbone / "pretrain.json").read_text())["classes"] == 10
    state = load_file(str(smoke_backbone / "backbone.safetensors"))
    model = build_backbone(7, smoke=True, file=str(smoke_backbone / "backbone.safetensors"))
    assert torch.equal(model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    assert model.get_classifier().out_features == 7  # a new head for the new task
    with pytest.raises(ValueError, match="does not fit"):
        build_backbone(7, smoke=False, file=str(smoke_backbone / "backbone.safetensors"))


def test_proxy_smoke_end_to_end_with_spectrum(smoke_backbone, tmp_path):
    from experiments import spectrum

    backbone = str(smoke_backbone / "backbone.safetensors")
    record = proxy.main(["--smoke", "--backbone", backbone, "--out", str(tmp_path), "--spectrum-dir", str(tmp_path / "adapters")])
    saved = json.loads((tmp_path / "proxy.json").read_text())
    table = (tmp_path / "proxy.md").read_text()
    assert saved["smoke"] and "SMOKE MODE" in table
    assert {r["method"] for r in saved["rows"].values()} == set(proxy.METHODS)
    assert len(saved["records"]) == record["runs"] == len((tmp_path / "proxy_records.jsonl").read_text().splitlines())
    rows = saved["rows"]
    serial, lora = rows["digits|1|Serial"], rows["digits|1|LoRA"]
    assert lora["adapter_parameters"] == 3 * serial["adapter_parameters"]  # PEFT on timm's fused qkv + proj
    assert rows["digits|1|LoRA r/4"]["adapter_parameters"] * 4 == lora["adapter_parameters"]
    assert all(math.isfinite(t["ms_per_step"]) for t in saved["step_times"].values())
    assert {p["pair"] for p in saved["paired"]} == {"Serial - LoRA", "Serial+ - LoRA+", "Serial - LoRA r/4"}
    # --resume keeps the runs and never repeats one; it only widens grids whose best value is still at an edge.
    resumed = proxy.main(["--smoke", "--backbone", backbone, "--out", str(tmp_path), "--resume"])
    keys = [tuple(r[k] for k in ("task", "shots", "seed", "method", "lr_exp", "ratio_exp")) for r in resumed["records"]]
    assert len(keys) == len(set(keys)) >= len(saved["records"])
    # Pooling a search with itself: every cell has twice the pairs, the same mean, twice the wins.
    pooled = proxy.main(["--pool", str(tmp_path / "proxy.json"), str(tmp_path / "proxy.json"), "--out", str(tmp_path / "pooled")])
    once = {(p["task"], p["shots"], p["pair"], p["setting"]): p for p in saved["paired"]}
    assert len(pooled["paired"]) == len(once) and (tmp_path / "pooled" / "proxy_pooled.md").is_file()
    for p in pooled["paired"]:
        single = once[p["task"], p["shots"], p["pair"], p["setting"]]
        assert (p["seeds"], p["wins"]) == (2 * single["seeds"], 2 * single["wins"])
        assert p["mean"] == pytest.approx(single["mean"])
    rebuilt = proxy.main(["--from-records", str(tmp_path / "proxy_records.jsonl"), "--out", str(tmp_path / "again")])
    assert rebuilt["rows"].keys() == saved["rows"].keys()
    assert "INCOMPLETE" in (tmp_path / "again" / "proxy.md").read_text()
    # Fig. 3 from the saved adapters: one CSV row per block x projection x singular value (2 x 3 x 32).
    result = spectrum.main(["--smoke", "--backbone", backbone, "--adapters", str(tmp_path / "adapters"),
                            "--out", str(tmp_path / "spectrum")])
    assert [r["rows"] for r in result.values()] == [2 * 3 * 32] * 2
    assert all(Path(r["png"]).stat().st_size > 1000 for r in result.values())
    # The same figure through the CLI a user runs: the backbone file's 10-class pre-training head is no obstacle.
    from experiments.pretrain_proxy import ARCH, SMOKE_BACKBONE
    from serial_lora_core.cli import main as cli_main

    assert cli_main(["analyze", str(tmp_path / "adapters" / "serial.safetensors"), "--model", ARCH, "--pretrained-file",
                     backbone, "--model-kwargs", json.dumps(SMOKE_BACKBONE), "--compare", str(tmp_path / "adapters" / "lora"),
                     "--output-dir", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "spectra.csv").read_bytes() == Path(result["serial_vs_lora"]["csv"]).read_bytes()



def test_run_proxy_script_smoke_end_to_end(tmp_path):
    """The shell script EXPERIMENTS.md records, with SMOKE=1: pre-training, search and figure in one go."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHON": sys.executable, "WORKERS": "0", "SMOKE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(Path(proxy.__file__).parent / "run_proxy.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "proxy.json").read_text())
    assert saved["smoke"] and saved["complete"] and saved["time_budget"] is None  # BUDGET's default: no limit
    assert json.loads((tmp_path / "proxy_backbone" / "pretrain.json").read_text())["smoke"]
    for pair in ("serial_vs_lora", "serial_plus_vs_lora_plus"):
        assert (tmp_path / "spectrum" / pair / "spectra.png").stat().st_size > 1000

# LoRA's adapter parameters / Serial's on each tiny system: CLIP split q,k,v,o (4x), SAM's fused qkv + proj (3x,
# PEFT shares A across q,k,v), SD3 (3.75x: the last joint block has no text output projection).
TABLES = {"table2_sd3": ("fid", 3.75), "table3_clip": ("top1", 4.0), "table4_sam": ("dice", 3.0)}


@pytest.mark.parametrize("name", TABLES)
def test_paper_table_script_smoke_end_to_end(name, tmp_path):
    import importlib

    from experiments.tables import METHOD_ARGS

    metric, ratio = TABLES[name]
    record = importlib.import_module(f"experiments.{name}").main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    table = (tmp_path / f"{name}.md").read_text()
    assert saved["smoke"] and record["smoke"] and "SMOKE MODE" in table
    assert sorted(r["method"] for r in saved["runs"]) == sorted(METHOD_ARGS)
    assert all(math.isfinite(r["metrics"][metric]) for r in saved["runs"])
    params = {r["method"]: r["adapter_parameters"] for r in saved["runs"]}
    assert params["LoRA"] == params["LoRA+"] == ratio * params["Serial LoRA"] > 0
    assert params["Serial LoRA"] == params["Serial LoRA+"]
    assert all(f"| {method} |" in table for method in METHOD_ARGS)


@pytest.mark.parametrize("name", TABLES)
def test_paper_table_script_needs_its_inputs(name, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"experiments.{name}").main(["--out", "unused"])
    assert exit_info.value.code == 2 and "required (or --smoke)" in capsys.readouterr().err


def test_sd3_table_names_an_image_without_caption(tmp_path):
    from experiments.table2_sd3 import pairs

    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no caption \(.txt\) for \['a.png'\]"):
        pairs(tmp_path)
