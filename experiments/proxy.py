"""The offline proxy for the paper's claim: few-shot transfer of a small pre-trained ViT, every method tuned.

No pretrained weights or datasets are reachable offline, so this is the smallest setup where the question
"does Serial LoRA match LoRA with 1/4 of the parameters?" means something:

- backbone: the small timm ViT that experiments/pretrain_proxy.py pre-trains on procedural fractals;
- tasks: (a) scikit-learn's bundled handwritten digits (real images, 8x8 upsampled to 32 px) and (b) the
  procedural `shapes` task (experiments/procedural.py), both 10 classes, each with a held-out test pool
  that no training or tuning ever sees;
- N-shot training sets (1/4/16 shots per class, `--seeds` seeds) drawn with the trainers' own sampler
  (`serial_lora_train.data.few_shot_indices`), plus a disjoint validation set of N more images per class
  from the same pool (never from the test pool) used only to choose hyper-parameters;
- methods: LoRA, LoRA+, Serial, Serial+ at rank r, LoRA at rank r/4 (about Serial's budget), a linear
  probe and full fine-tuning. The adapters are the trainers' adapters (`serial_lora_train.methods`:
  Serial through the core, LoRA through PEFT on timm's fused qkv + proj) with their optimizer groups
  (LoRA+ through `methods.parameter_groups`); a lean in-memory loop drives them because the thousands
  of short runs would otherwise be dominated by per-run set-up;
- every method at the paper's defaults (rank 32, lr 2e-4, dropout 0.25, LoRA+ ratio 20, 50 epochs, bf16
  on GPU) AND at its own learning rate (and LoRA+ ratio) chosen by mean validation accuracy over the
  seeds, on a log grid that is widened wherever the best value sits at its edge (`--max-rounds`);
- paired differences per seed (Serial minus LoRA on the same shots, head initialisation and batch order).

    python -m experiments.pretrain_proxy --out experiments/results/proxy_backbone
    python -m experiments.proxy --backbone experiments/results/proxy_backbone/backbone.safetensors \\
        --out experiments/results --workers 12
    python -m experiments.proxy ... --resume                   # keep OUT's runs, add what is missing or wider
    python -m experiments.proxy --from-records OUT/proxy_records.jsonl --out OUT   # tables of an interrupted search
    python -m experiments.proxy --pool A/proxy.json B/proxy.json --out OUT   # paired differences over searches
    python -m experiments.proxy --smoke --out /tmp/proxy        # CPU, seconds: tests the pipeline only
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from experiments.common import environment, fmt, markdown_table, mean_std, read_jsonl, smoke_banner, write_results
from experiments.pretrain_proxy import accuracy, augment, build_backbone, to_input
from experiments.procedural import digits_dataset, shapes_dataset

PAPER_LR, PAPER_RATIO, PAPER_RANK, PAPER_DROPOUT, PAPER_EPOCHS = 2e-4, 20.0, 32, 0.25, 50
LR_STEP = math.sqrt(10.0)  # grid: PAPER_LR x LR_STEP^k
RATIO_STEP = 4.0  # grid: PAPER_RATIO x RATIO_STEP^k
MAX_EXTENSION = 6  # never search further than LR_STEP^(half-width + 6) from the paper's lr


@dataclass(frozen=True)
class MethodSpec:
    """kind: serial | lora (adapters) | linear (head only) | full (every weight); rank = PAPER_RANK // divisor."""

    kind: str
    rank_divisor: int = 1
    plus: bool = False


METHODS: dict[str, MethodSpec] = {
    "LoRA": MethodSpec("lora"),
    "LoRA+": MethodSpec("lora", plus=True),
    "Serial": MethodSpec("serial"),
    "Serial+": MethodSpec("serial", plus=True),
    "LoRA r/4": MethodSpec("lora", rank_divisor=4),
    "Linear probe": MethodSpec("linear"),
    "Full FT": MethodSpec("full"),
}
PAIRS = (("Serial", "LoRA"), ("Serial+", "LoRA+"), ("Serial", "LoRA r/4"))


@dataclass(frozen=True)
class Job:
    """One training run; lr = PAPER_LR x LR_STEP^lr_exp, ratio = PAPER_RATIO x RATIO_STEP^ratio_exp (plus only)."""

    task: str
    shots: int
    seed: int
    method: str
    lr_exp: int = 0
    ratio_exp: int = 0

    @property
    def lr(self) -> float:
        return PAPER_LR * LR_STEP ** self.lr_exp

    @property
    def ratio(self) -> float | None:
        return PAPER_RATIO * RATIO_STEP ** self.ratio_exp if METHODS[self.method].plus else None


# ------------------------------------------------------------------------------------------------ data


def load_task(name: str, size: int = 32, smoke: bool = False) -> dict[str, torch.Tensor]:
    """A task's sampling pool and its held-out test pool (uint8 images, labels); split once, seed-free."""
    if name == "digits":
        images, labels = digits_dataset(size)
        # Every other image of each class goes to the test pool (a fixed, stratified half).
        rank_in_class = torch.zeros_like(labels)
        for c in labels.unique():
            members = (labels == c).nonzero().flatten()
            rank_in_class[members] = torch.arange(len(members))
        test = rank_in_class % 2 == 1
        pool, held = ~test, test
    elif name == "shapes":
        per_class = 40 if smoke else 120
        images, labels = shapes_dataset(per_class * 2, size, seed=1)
        held = (torch.arange(len(labels)) % (per_class * 2)) >= per_class
        pool = ~held
    else:
        raise ValueError(f"unknown task {name!r}; choose from digits, shapes")
    if smoke:  # a smaller test pool keeps the smoke run fast
        held = held & (torch.arange(len(labels)) % 4 == 0)
    return {"pool_x": images[pool], "pool_y": labels[pool], "test_x": images[held], "test_y": labels[held]}


def few_shot_split(labels: torch.Tensor, shots: int, seed: int, val_per_class: int | None = None
                   ) -> tuple[list[int], list[int]]:
    """(train, validation) indices into `labels`: `shots` per class for training, drawn by the trainers'
    sampler (what `train-classifier --shots N --seed S` would pick), then `val_per_class` (default: `shots`)
    more per class for choosing hyper-parameters, from the images that are NOT training shots."""
    from serial_lora_train.data import few_shot_indices

    val_per_class = shots if val_per_class is None else val_per_class
    targets = labels.tolist()
    train = few_shot_indices(targets, shots, seed)
    chosen = set(train)
    rest = [i for i in range(len(targets)) if i not in chosen]
    picked = few_shot_indices([targets[i] for i in rest], val_per_class, seed + 1_000_003)
    return train, sorted(rest[i] for i in picked)


# ------------------------------------------------------------------------------------------- one run

_WORKER: dict[str, Any] = {}


def _setup_worker(backbone: str | None, smoke: bool, tasks: Sequence[str], threads: int) -> None:
    """Per process: device, the tasks' tensors on it, and one pristine backbone per class count."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = {name: {k: v.to(device) for k, v in load_task(name, smoke=smoke).items()} for name in tasks}
    classes = {name: int(d["pool_y"].max()) + 1 for name, d in data.items()}
    bases = {n: build_backbone(n, smoke, backbone).to(device).eval() for n in set(classes.values())}
    _WORKER.update(device=device, data=data, classes=classes, bases=bases, smoke=smoke, splits={})


def _split(job: Job) -> tuple[torch.Tensor, torch.Tensor]:
    key = (job.task, job.shots, job.seed)
    if key not in _WORKER["splits"]:
        train, val = few_shot_split(_WORKER["data"][job.task]["pool_y"].cpu(), job.shots, job.seed)
        device = _WORKER["device"]
        _WORKER["splits"][key] = (torch.tensor(train, device=device), torch.tensor(val, device=device))
    return _WORKER["splits"][key]


def build_model(job: Job) -> tuple[nn.Module, dict[str, Any]]:
    """The pristine backbone, a head initialised from the seed alone (equal across methods), the method."""
    from serial_lora_core import count_trainable_parameters
    from serial_lora_train.methods import apply_method

    spec = METHODS[job.method]
    model = copy.deepcopy(_WORKER["bases"][_WORKER["classes"][job.task]])
    head = model.get_classifier()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(job.seed)
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.02)
        head.bias.zero_()
    torch.manual_seed(job.seed * 1_000 + 17)  # adapter init and dropout: per seed, not per worker
    info: dict[str, Any] = {}
    if spec.kind in ("serial", "lora"):
        rank = _rank(spec)
        model, method_info = apply_method(model, spec.kind, rank=rank, dropout=PAPER_DROPOUT,
                                          trainable_modules=("head",))
        info = {"rank": rank, "adapter_parameters": method_info.adapter_parameters, "note": method_info.note}
    else:
        model.requires_grad_(spec.kind == "full")
        head.requires_grad_(True)
        info = {"rank": None, "adapter_parameters": 0}
    info["trainable_parameters"] = count_trainable_parameters(model)
    return model, info


def _rank(spec: MethodSpec) -> int:
    rank = _WORKER.get("rank", PAPER_RANK)
    return max(1, rank // spec.rank_divisor)


def _optimizer(model: nn.Module, job: Job) -> torch.optim.Optimizer:
    from serial_lora_train.methods import parameter_groups

    groups = parameter_groups(model, job.lr, job.ratio)
    fused = _WORKER["device"].type == "cuda"
    return torch.optim.AdamW(groups, lr=job.lr, weight_decay=0.0, fused=fused)


def _steps(n_train: int, epochs: int) -> tuple[int, int]:
    """(batch size, optimizer steps) for `epochs` passes over `n_train` images, batches of at most 32."""
    batch = min(32, n_train)
    return batch, epochs * math.ceil(n_train / batch)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                steps: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """`steps` AdamW steps on in-memory (x, y): epoch permutations, small random shifts, bf16 on GPU,
    gradient clipping at 1.0 (the engine's default). Returns the last loss."""
    device = x.device
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    order = torch.empty(0, dtype=torch.long, device=device)
    loss = torch.zeros((), device=device)
    for _ in range(steps):
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(len(x), generator=generator, device=device)])
        idx, order = order[:batch], order[batch:]
        inputs = augment(to_input(x[idx]), generator, flip=False, shift=2)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(inputs), y[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=device.type == "cuda")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def train_job(job: Job) -> tuple[nn.Module, dict[str, Any]]:
    """Train one configuration; returns the model and its record (validation and test accuracy)."""
    data = _WORKER["data"][job.task]
    train_idx, val_idx = _split(job)
    model, info = build_model(job)
    optimizer = _optimizer(model, job)
    batch, steps = _steps(len(train_idx), _WORKER["epochs"])
    generator = torch.Generator(device=_WORKER["device"]).manual_seed(job.seed)  # same batches for every method
    start = time.perf_counter()
    loss = float(train_steps(model, optimizer, data["pool_x"][train_idx], data["pool_y"][train_idx], steps, batch,
                             generator))
    record = {
        **asdict(job), "lr": job.lr, "ratio": job.ratio, **info, "steps": steps, "batch": batch,
        "train_loss": loss if math.isfinite(loss) else None,  # None: diverged (kept: a bad configuration)
        "val_top1": accuracy(model, data["pool_x"][val_idx], data["pool_y"][val_idx]),
        "test_top1": accuracy(model, data["test_x"], data["test_y"]),
        "seconds": time.perf_counter() - start,
    }
    return model, record


def run_job(job: Job) -> dict[str, Any]:
    """`train_job`'s record only (what the worker pool sends back)."""
    if "error" in _WORKER:
        raise RuntimeError(f"the worker could not set up: {_WORKER['error']!r}") from _WORKER["error"]
    return train_job(job)[1]


def _init_pool(backbone: str | None, smoke: bool, tasks: Sequence[str], epochs: int, rank: int) -> None:
    try:
        _setup_worker(backbone, smoke, tasks, threads=1)
    except Exception as err:  # noqa: BLE001  (re-raised by run_job: a pool would respawn a failing initializer forever)
        _WORKER["error"] = err
    _WORKER.update(epochs=epochs, rank=rank)


def run_jobs(jobs: Sequence[Job], pool: Any, log: Path | None = None, deadline: float = math.inf) -> list[dict[str, Any]]:
    """Run `jobs` in `pool` (a worker pool sharing the device) or, with pool None, in this process.

    Each record is appended to `log` (JSON lines) as it arrives, so an interrupted search keeps its runs;
    past `deadline` (time.perf_counter()) the remaining jobs are dropped (and the pool is terminated).
    """
    # Seed-major order: a search cut short by its deadline loses whole seeds, not whole settings.
    jobs = sorted(jobs, key=lambda j: (j.seed, -j.shots, j.task, j.method, j.lr_exp, j.ratio_exp))
    records: list[dict[str, Any]] = []
    results = pool.imap_unordered(run_job, jobs, chunksize=1) if pool is not None else map(run_job, jobs)
    with open(log, "a") if log is not None else contextlib.nullcontext() as handle:
        for record in results:
            records.append(record)
            if handle is not None:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
            if time.perf_counter() > deadline:
                if pool is not None:
                    pool.terminate()
                break
    return records


def worker_pool(workers: int, init_args: tuple) -> Any:
    """A pool of `workers` spawned processes (each with the device, data and backbone), or a null context."""
    if workers <= 0:
        _init_pool(*init_args)
        return contextlib.nullcontext()
    import torch.multiprocessing as mp

    return mp.get_context("spawn").Pool(workers, initializer=_init_pool, initargs=init_args)


# ---------------------------------------------------------------------------------------- the search


def grid_jobs(tasks: Iterable[str], shots: Iterable[int], seeds: Iterable[int], methods: Iterable[str],
              lr_half_width: int, ratio_half_width: int) -> list[Job]:
    """The initial grid: lr exponents -w..w for every method, ratio exponents -v..v for the LoRA+ variants."""
    jobs = []
    for task, n, seed, method in itertools.product(tasks, shots, seeds, methods):
        ratios = range(-ratio_half_width, ratio_half_width + 1) if METHODS[method].plus else (0,)
        for lr_exp, ratio_exp in itertools.product(range(-lr_half_width, lr_half_width + 1), ratios):
            jobs.append(Job(task, n, seed, method, lr_exp, ratio_exp))
    return jobs


def _by_cell(records: Iterable[dict[str, Any]]) -> dict[tuple, dict[tuple[int, int], list[dict]]]:
    """(task, shots, method) -> (lr_exp, ratio_exp) -> the records of every seed."""
    cells: dict[tuple, dict[tuple[int, int], list[dict]]] = {}
    for r in records:
        cells.setdefault((r["task"], r["shots"], r["method"]), {}).setdefault((r["lr_exp"], r["ratio_exp"]), []).append(r)
    return cells


def select(configs: dict[tuple[int, int], list[dict]]) -> tuple[int, int]:
    """The configuration with the best mean validation accuracy over seeds (ties: closest to the paper's)."""
    return max(configs, key=lambda c: (statistics.fmean(r["val_top1"] for r in configs[c]), -abs(c[0]) - abs(c[1]), -c[0]))


def at_edge(configs: dict[tuple[int, int], list[dict]], best: tuple[int, int]) -> dict[str, int]:
    """Directions in which `best` sits on the edge of what was searched: {"lr": -1|+1, "ratio": -1|+1}."""
    edges = {}
    lrs, ratios = {c[0] for c in configs}, {c[1] for c in configs}
    if best[0] in (min(lrs), max(lrs)) and len(lrs) > 1:
        edges["lr"] = -1 if best[0] == min(lrs) else 1
    if best[1] in (min(ratios), max(ratios)) and len(ratios) > 1:
        edges["ratio"] = -1 if best[1] == min(ratios) else 1
    return edges


def _done(records: Iterable[dict[str, Any]]) -> set[Job]:
    return {Job(**{k: r[k] for k in ("task", "shots", "seed", "method", "lr_exp", "ratio_exp")}) for r in records}


def extension_jobs(records: list[dict[str, Any]], seeds: Sequence[int], limit: int) -> list[Job]:
    """Widen the grid of every (task, shots, method) whose best configuration sits at an edge (runs not yet done)."""
    jobs: set[Job] = set()
    for (task, n, method), configs in _by_cell(records).items():
        best = select(configs)
        lrs, ratios = sorted({c[0] for c in configs}), sorted({c[1] for c in configs})
        edges = at_edge(configs, best)
        new_lrs = [best[0] + edges["lr"]] if "lr" in edges and abs(best[0] + edges["lr"]) <= limit else []
        new_ratios = [best[1] + edges["ratio"]] if "ratio" in edges and abs(best[1] + edges["ratio"]) <= limit else []
        configs_new = [(lr, r) for lr in new_lrs for r in ratios] + [(lr, r) for r in new_ratios for lr in lrs + new_lrs]
        jobs.update(Job(task, n, s, method, lr, r) for lr, r in configs_new for s in seeds)
    jobs -= _done(records)
    return sorted(jobs, key=lambda j: (j.task, j.shots, j.method, j.lr_exp, j.ratio_exp, j.seed))


# ------------------------------------------------------------------------------------------ analysis


def t_interval(values: Sequence[float]) -> float:
    """Half-width of the 95% Student-t interval of the mean (0 for fewer than 2 values)."""
    if len(values) < 2:
        return 0.0
    from scipy.stats import t

    return float(t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (task, shots, method): default and tuned test accuracy per seed; paired differences."""
    cells = _by_cell(records)
    rows: dict[str, dict[str, Any]] = {}
    for (task, n, method), configs in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], list(METHODS).index(kv[0][2]))):
        best = select(configs)
        default = configs.get((0, 0), [])
        pick = configs[best]
        rows[f"{task}|{n}|{method}"] = {
            "task": task, "shots": n, "method": method,
            "default_test": {r["seed"]: r["test_top1"] for r in default},
            "tuned_test": {r["seed"]: r["test_top1"] for r in pick},
            "tuned_val": statistics.fmean(r["val_top1"] for r in pick),
            "tuned_lr": pick[0]["lr"], "tuned_ratio": pick[0]["ratio"],
            "searched_lr": sorted({r[0]["lr"] for r in configs.values()}),
            "searched_ratio": sorted({r[0]["ratio"] for r in configs.values() if r[0]["ratio"] is not None}),
            "edge": at_edge(configs, best),
            "adapter_parameters": pick[0]["adapter_parameters"],
            "trainable_parameters": pick[0]["trainable_parameters"],
            "rank": pick[0]["rank"],
            "configs_searched": len(configs),
        }
    paired = []
    for task, n in sorted({(r["task"], r["shots"]) for r in rows.values()}):
        for a, b in PAIRS:
            ra, rb = rows.get(f"{task}|{n}|{a}"), rows.get(f"{task}|{n}|{b}")
            if ra is None or rb is None:
                continue
            for setting in ("default_test", "tuned_test"):
                seeds = sorted(set(ra[setting]) & set(rb[setting]))
                diffs = [ra[setting][s] - rb[setting][s] for s in seeds]
                if diffs:
                    paired.append({"task": task, "shots": n, "pair": f"{a} - {b}", "setting": setting.split("_")[0],
                                   "per_seed": dict(zip(seeds, diffs)), **paired_stats(diffs)})
    return {"rows": rows, "paired": paired}


def paired_stats(diffs: Sequence[float]) -> dict[str, Any]:
    """Mean, std, 95% t half-width, wins, losses and count of paired differences."""
    mean, std = mean_std(diffs)
    return {"mean": mean, "std": std, "ci95": t_interval(diffs), "wins": sum(d > 0 for d in diffs),
            "losses": sum(d < 0 for d in diffs), "seeds": len(diffs)}


def paired_table(paired: list[dict[str, Any]]) -> str:
    """The paired-differences table (percentage points) of `summarize` or `pool_searches`."""
    body = [[p["task"], p["shots"], p["pair"], p["setting"], f"{p['mean'] * 100:+.1f}", f"{p['std'] * 100:.1f}",
             f"±{p['ci95'] * 100:.1f}", f"{p['wins']}/{p['losses']}/{p['seeds']}"] for p in paired]
    return markdown_table(["task", "shots", "difference", "setting", "mean", "std", "95% CI", "W/L/N"], body)


def pool_searches(paths: Sequence[str], out: str) -> dict[str, Any]:
    """Paired differences of several searches (e.g. two backbones) with each cell's seeds pooled: every search
    keeps its own tuning; the interval treats all pairs as independent (too narrow if searches differ)."""
    runs = [json.loads(Path(path).read_text()) for path in paths]
    groups: dict[tuple, list[float]] = {}
    for run in runs:
        for p in run["paired"]:
            groups.setdefault((p["task"], p["shots"], p["pair"], p["setting"]), []).extend(p["per_seed"].values())
    paired = [{"task": t, "shots": n, "pair": pair, "setting": setting, "per_seed": diffs, **paired_stats(diffs)}
              for (t, n, pair, setting), diffs in groups.items()]
    record = {"experiment": "offline proxy, paired differences pooled over searches", "sources": list(paths),
              "smoke": any(run["smoke"] for run in runs), "complete": all(run["complete"] for run in runs),
              "paired": paired, "environment": environment()}
    text = (smoke_banner(record["smoke"]) + "# Offline proxy: paired differences pooled over searches\n\n"
            f"Sources: {', '.join(f'`{p}`' for p in paths)} ({'all' if record['complete'] else 'NOT all'} complete). "
            "Percentage points; each search tuned on its own validation data; CI: 95% Student-t interval treating "
            "every pair as independent; W/L/N: pairs where the first method wins / loses / pairs.\n\n"
            + paired_table(paired) + "\n")
    write_results(out, "proxy_pooled", record, text)
    return record


def _ratio_text(value: float | None) -> str:
    return "" if value is None else f", ratio {value:g}"


def _widenings(record: dict[str, Any]) -> str:
    """How many grid-widening rounds ran (the first round is the initial grid), as the record knows it."""
    rounds = record.get("rounds_run")
    if rounds is None:
        return "an unknown number of widening rounds"
    return f"{max(rounds - 1, 0)} widening round(s) run, {record['max_rounds']} allowed"


def markdown(summary: dict[str, Any], record: dict[str, Any]) -> str:
    rows, paired = summary["rows"], summary["paired"]
    out = [smoke_banner(record["smoke"]),
           "# Offline proxy: few-shot transfer of a small fractal-pretrained ViT\n\n",
           f"Test top-1 (%) on held-out data, mean ± std over {len(record['seeds'])} seeds "
           f"({', '.join(map(str, record['seeds']))}); all numbers from this proxy, none from real data. "
           f"Defaults (the paper's): rank {record['rank']}, lr {PAPER_LR:g}, dropout {PAPER_DROPOUT}, LoRA+ ratio "
           f"{PAPER_RATIO:g}, {record['epochs']} epochs. Tuned: each method's own lr (and ratio) chosen by mean "
           "validation accuracy over the seeds on a validation set disjoint from the training shots.\n\n"]
    if not record["complete"]:
        out.append(f"> **INCOMPLETE**: {record['runs']} of {record['runs_planned'] or 'the planned'} runs finished "
                   "within the time budget; cells may have fewer seeds than listed.\n\n")
    for task in record["tasks"]:
        body = []
        for r in (v for v in rows.values() if v["task"] == task):
            edge = " (edge!)" if r["edge"] else ""
            body.append([r["shots"], r["method"], f"{r['adapter_parameters']:,}", f"{r['trainable_parameters']:,}",
                         fmt(list(r["default_test"].values())) if r["default_test"] else "-",
                         fmt(list(r["tuned_test"].values())),
                         f"{r['tuned_lr']:.2g}{_ratio_text(r['tuned_ratio'])}{edge}", r["configs_searched"],
                         len(r["tuned_test"])])
        out += [f"## {task}\n\n", markdown_table(
            ["shots", "method", "adapter params", "trainable params (incl. head)", "test top-1 @ paper defaults",
             "test top-1 @ tuned", "tuned lr", "configs searched", "seeds"], body), "\n"]
    out += ["## Paired differences (same shots, head init and batch order per seed)\n\n",
            "Percentage points; CI: 95% Student-t interval of the mean difference; W/L/N: seeds where the first "
            "method wins / loses / seeds.\n\n", paired_table(paired), "\n"]
    if record.get("step_times"):
        body = [[m, f"{t['ms_per_step']:.2f}", f"{t['adapter_parameters']:,}", f"{t['trainable_parameters']:,}"]
                for m, t in record["step_times"].items()]
        out += [f"## Step time (batch {record['step_time_batch']}, {record['environment']['device']}, one process)\n\n",
                markdown_table(["method", "ms / step", "adapter params", "trainable params"], body), "\n"]
    edges = [k for k, v in rows.items() if v["edge"]]
    untuned = [k for k, v in rows.items() if len(v["searched_lr"]) < 2]
    out.append("Grid edges: " + ("no method's best value sits at the edge of its searched grid" if not edges else
               f"best value still at the edge of the searched grid (after {_widenings(record)}) for: "
               f"{', '.join(edges)}") + ".\n")
    if untuned:
        out.append(f"Not tuned (a single learning rate searched): {', '.join(untuned)}.\n")
    return "".join(out)


# ---------------------------------------------------------------------------------------- step times


def step_times(methods: Sequence[str], task: str, batch: int, steps: int) -> dict[str, dict[str, Any]]:
    """Milliseconds per training step of each method, measured in this process (after the pool is done)."""
    data = _WORKER["data"][task]
    x, y = data["pool_x"][:batch], data["pool_y"][:batch]
    out = {}
    for method in methods:
        job = Job(task, 1, 0, method)
        model, info = build_model(job)
        optimizer = _optimizer(model, job)
        generator = torch.Generator(device=x.device).manual_seed(0)
        train_steps(model, optimizer, x, y, 5, batch, generator)  # warm-up
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_steps(model, optimizer, x, y, steps, batch, generator)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        out[method] = {"ms_per_step": (time.perf_counter() - start) * 1000 / steps, **info}
    return out


def save_spectrum_adapters(folder: str, task: str, shots: int) -> dict[str, Any]:
    """Train LoRA, LoRA+, Serial and Serial+ at the paper's defaults (seed 0) and save their adapters:
    Serial as the core's file (`<name>.safetensors`), LoRA as PEFT's folder, for `serial-lora analyze`."""
    from serial_lora_core import save_serial_lora

    out = Path(folder)
    saved = {}
    for method in ("Serial", "Serial+", "LoRA", "LoRA+"):
        model, record = train_job(Job(task, shots, 0, method))
        name = method.replace("+", "_plus").lower()
        if METHODS[method].kind == "serial":
            path = save_serial_lora(model.cpu(), out / f"{name}.safetensors", modules_to_save=("head",))
        else:
            path = out / name
            model.cpu().save_pretrained(str(path))
        saved[method] = {"path": str(path), "test_top1": record["test_top1"]}
    return {"task": task, "shots": shots, "seed": 0, "adapters": saved}


def rebuild(records_path: str, out: str) -> dict[str, Any]:
    """Tables from the records an interrupted search wrote (marked incomplete; no step times)."""
    records = read_jsonl(records_path)
    if not records:
        raise ValueError(f"{records_path} holds no run records; run the search first")
    summary = summarize(records)
    record = {
        "experiment": "offline proxy (experiments/proxy.py), rebuilt from an interrupted search's records",
        "smoke": False, "tasks": sorted({r["task"] for r in records}), "shots": sorted({r["shots"] for r in records}),
        "seeds": sorted({r["seed"] for r in records}), "methods": [m for m in METHODS if any(r["method"] == m for r in records)],
        "epochs": PAPER_EPOCHS, "rank": max(r["rank"] or 0 for r in records), "max_rounds": None, "runs": len(records),
        "runs_planned": None, "complete": False, "step_times": {}, "environment": environment(), **summary,
        "records": records,
    }
    write_results(out, "proxy", record, markdown(summary, record))
    return record


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", help="backbone.safetensors from experiments.pretrain_proxy")
    parser.add_argument("--out", required=True, help="folder for proxy.json and proxy.md")
    parser.add_argument("--tasks", nargs="+", default=["digits", "shapes"], choices=["digits", "shapes"])
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--epochs", type=int, default=PAPER_EPOCHS)
    parser.add_argument("--rank", type=int, default=PAPER_RANK)
    parser.add_argument("--lr-half-width", type=int, default=2, help=f"initial lr grid: {PAPER_LR:g} x {LR_STEP:.3g}^(-w..w)")
    parser.add_argument("--ratio-half-width", type=int, default=1, help=f"initial LoRA+ ratio grid: {PAPER_RATIO:g} x {RATIO_STEP:g}^(-v..v)")
    parser.add_argument("--max-rounds", type=int, default=4, help="grid-widening rounds at most")
    parser.add_argument("--workers", type=int, default=0, help="processes sharing the device (0: this one)")
    parser.add_argument("--step-time-steps", type=int, default=50)
    parser.add_argument("--time-budget", type=float, default=math.inf,
                        help="seconds for the search; runs not started by then are dropped and the tables say so")
    parser.add_argument("--spectrum-dir", help="also train LoRA, LoRA+, Serial, Serial+ at the paper's defaults on "
                        "the first task's largest shot count (seed 0) and save their adapters here (for Fig. 3)")
    parser.add_argument("--smoke", action="store_true", help="tiny random backbone, few runs (CPU, seconds)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in OUT/proxy_records.jsonl and run only what is missing (and widen)")
    parser.add_argument("--from-records", dest="from_records",
                        help="rebuild proxy.json/.md from a proxy_records.jsonl of an interrupted search, without training")
    parser.add_argument("--pool", nargs="+", metavar="PROXY_JSON",
                        help="write OUT/proxy_pooled.md/.json: the paired differences of these searches' proxy.json, "
                        "seeds pooled per cell (e.g. two backbones), without training")
    args = parser.parse_args(argv)
    if args.from_records:
        return rebuild(args.from_records, args.out)
    if args.pool:
        return pool_searches(args.pool, args.out)
    if args.smoke:
        args.shots, args.seeds, args.epochs, args.rank = [1], 2, 2, 8
        args.lr_half_width, args.ratio_half_width, args.max_rounds, args.step_time_steps = 1, 0, 1, 2
    elif not args.backbone:
        parser.error("--backbone is required (run experiments.pretrain_proxy first), or pass --smoke")
    start = time.perf_counter()
    deadline = start + args.time_budget
    seeds = list(range(args.seeds))
    init_args = (args.backbone, args.smoke, tuple(args.tasks), args.epochs, args.rank)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "proxy_records.jsonl"
    records: list[dict[str, Any]] = []
    if args.resume and log.is_file():  # keep the runs of an earlier (interrupted or narrower) search
        records = read_jsonl(log)
    else:
        log.unlink(missing_ok=True)
    jobs = [j for j in grid_jobs(args.tasks, args.shots, seeds, args.methods, args.lr_half_width,
                                 args.ratio_half_width) if j not in _done(records)]
    planned, rounds = len(records) + len(jobs), 0
    if not jobs and records:
        jobs = extension_jobs(records, seeds, args.lr_half_width + MAX_EXTENSION)
        planned += len(jobs)
    build_backbone(10, args.smoke, args.backbone)  # fail here, before any worker starts, if the file does not fit
    with worker_pool(args.workers, init_args) as pool:
        while jobs and time.perf_counter() < deadline:
            print(f"round {rounds}: {len(jobs)} runs ({time.perf_counter() - start:.0f} s so far)", flush=True)
            records += run_jobs(jobs, pool, log, deadline)
            rounds += 1
            if rounds > args.max_rounds:
                break
            jobs = extension_jobs(records, seeds, args.lr_half_width + MAX_EXTENSION)
            planned += len(jobs)
    search_seconds = time.perf_counter() - start
    if not _WORKER:
        _init_pool(*init_args)
    times = step_times(args.methods, args.tasks[0], 32, args.step_time_steps)
    spectrum = save_spectrum_adapters(args.spectrum_dir, args.tasks[0], max(args.shots)) if args.spectrum_dir else None
    summary = summarize(records)
    record = {
        "experiment": "offline proxy (experiments/proxy.py)",
        "smoke": args.smoke, "backbone": args.backbone, "tasks": args.tasks, "shots": args.shots, "seeds": seeds,
        "methods": args.methods, "epochs": args.epochs, "rank": args.rank,
        "paper_defaults": {"learning_rate": PAPER_LR, "lora_plus_ratio": PAPER_RATIO, "dropout": PAPER_DROPOUT},
        "lr_grid_step": LR_STEP, "ratio_grid_step": RATIO_STEP, "max_rounds": args.max_rounds,
        "rounds_run": rounds, "runs": len(records), "runs_planned": planned, "workers": args.workers,
        "complete": len(records) == planned, "time_budget": None if math.isinf(args.time_budget) else args.time_budget,
        "search_seconds": search_seconds, "step_time_batch": 32, "step_times": times,
        "spectrum_adapters": spectrum, "environment": environment(), **summary, "records": records,
    }
    record["wall_seconds"] = time.perf_counter() - start
    table = markdown(summary, record)
    write_results(args.out, "proxy", record, table)
    print(table)
    return record


if __name__ == "__main__":
    main()
