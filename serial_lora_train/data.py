"""Training data plumbing shared by the tasks: a resumable seeded sampler, per-sample seeding, image folders.

- `EpochBatchSampler`: batches of a seeded permutation per epoch, sharded over processes; it can start
  mid-epoch, which is how a resumed run continues at its exact data position.
- `SeededSamples`: seeds each sample's random transforms from (seed, epoch, index), so augmentations
  do not depend on the number of DataLoader workers nor on where a run was resumed.
- `scan_image_folder`: checks a class-per-sub-folder image folder before any training (missing or
  empty folder, class without images, unreadable images listed; `skip_bad_images` skips them).
- `scan_train_val`: a task's training and validation folders scanned and checked against each other.
- `image_folder_dataset`: torchvision's ImageFolder over a scan's checked samples.
- `few_shot_indices`: N samples per class, reproducibly from a seed (the paper's N-shot tables).
"""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers (stable across runs and platforms)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of (index, epoch) pairs: epoch e is a permutation seeded by (seed, e), cut into global batches of
    `batch_size x num_replicas`; process `rank` gets its slice of each. The permutation is padded cyclically so
    every process gets the same number of full batches (as torch's DistributedSampler pads).

    `endless=True` runs on through the following epochs, so one DataLoader iterator (and its workers'
    prefetching) lasts the whole run instead of draining at every epoch boundary.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 endless: bool = False) -> None:
        if num_samples < 1:
            raise ValueError("the training set is empty")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.num_replicas, self.rank, self.endless = num_replicas, rank, endless
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        """Batches per epoch (per process)."""
        return -(-self.num_samples // (self.batch_size * self.num_replicas))

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate from batch `start` of epoch `epoch` on (the next iteration only starts there)."""
        if not 0 <= start < len(self):
            raise ValueError(f"start batch {start} is outside epoch of {len(self)} batches")
        self.epoch, self.start = epoch, start

    def set_position(self, position: int) -> None:
        """Start at the `position`-th batch counted from the first batch of epoch 0."""
        self.set_epoch(*divmod(position, len(self)))

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The padded sample order of `epoch`, the same on every process."""
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        order = torch.randperm(self.num_samples, generator=generator)
        total = len(self) * self.batch_size * self.num_replicas
        return order.repeat(-(-total // self.num_samples))[:total]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start = self.epoch, self.start
        self.start = 0
        while True:
            order = self.epoch_order(epoch).view(len(self), self.num_replicas, self.batch_size)[:, self.rank]
            for batch in order[start:].tolist():
                yield [(index, epoch) for index in batch]
            if not self.endless:
                return
            epoch, start = epoch + 1, 0


class SeededSamples(torch.utils.data.Dataset):
    """`dataset[index]` with torch's, Python's and NumPy's RNGs seeded from (seed, epoch, index).

    The global RNG states are restored afterwards, so the training step's own randomness (dropout) is
    untouched when the DataLoader runs in the main process.
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, epoch = key
        sample_seed = mix_seed(self.seed, epoch, index)
        python_state = random.getstate()
        numpy_state = _numpy_state()
        try:
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only: torch.manual_seed would also (lazily) seed every CUDA device, per sample.
                torch.default_generator.manual_seed(sample_seed)
                random.seed(sample_seed)
                if numpy_state is not None:
                    import numpy as np

                    np.random.seed(sample_seed % 2**32)
                return self.dataset[index]
        finally:
            random.setstate(python_state)
            if numpy_state is not None:
                import numpy as np

                np.random.set_state(numpy_state)


def _numpy_state() -> Any:
    try:
        import numpy as np
    except ImportError:
        return None
    return np.random.get_state()


# ----------------------------------------------------------------------------------------------------------
# Image folders


@dataclass
class ImageFolderScan:
    """A checked image folder: (path, class index) samples, class names, and the images skipped as unreadable."""

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def targets(self) -> list[int]:
        return [target for _, target in self.samples]


def _unreadable(path: Path) -> str | None:
    """Why PIL cannot decode `path` (None when it can)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()  # decodes fully: verify() misses truncated files
    except Exception as err:  # noqa: BLE001  (PIL raises many types for bad files)
        return f"{type(err).__name__}: {err}"
    return None


def scan_image_folder(root: str | Path, argument: str = "train_dir", *, skip_bad_images: bool = False,
                      check_images: bool = True) -> ImageFolderScan:
    """Check `root` (one sub-folder per class, images inside) and list its samples, before any training.

    Raises ValueError naming `argument` and the folder for: a missing folder, no class sub-folder, a class
    with no image, unreadable images (all listed; with `skip_bad_images` they are skipped and counted).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{argument}={str(root)!r} does not exist or is not a folder; pass a folder with one "
                         "sub-folder of images per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{argument}={str(root)!r} has no class sub-folders; put each class's images in "
                         f"{root}/<class name>/")
    samples: list[tuple[str, int]] = []
    empty = []
    for index, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            empty.append(name)
        samples += [(str(p), index) for p in files]
    if empty:
        raise ValueError(f"{argument}={str(root)!r}: class folder(s) {empty} hold no image "
                         f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder(s)")
    skipped: list[tuple[str, str]] = []
    if check_images:
        # Decoding is most of the cost and PIL releases the GIL while decoding: threads scale.
        with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
            reasons = list(pool.map(_unreadable, (Path(path) for path, _ in samples)))
        skipped = [(path, why) for (path, _), why in zip(samples, reasons) if why is not None]
    if skipped and not skip_bad_images:
        listed = "; ".join(f"{p} ({why})" for p, why in skipped[:10])
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        raise ValueError(f"{argument}={str(root)!r}: {len(skipped)} unreadable image(s): {listed}{more}. Fix or "
                         "remove them, or pass --skip-bad-images to skip them")
    bad = {p for p, _ in skipped}
    samples = [s for s in samples if s[0] not in bad]
    left = {target for _, target in samples}
    lost = [name for i, name in enumerate(classes) if i not in left]
    if lost:
        raise ValueError(f"{argument}={str(root)!r}: class folder(s) {lost} hold only unreadable images")
    return ImageFolderScan(root, classes, samples, skipped)


def scan_train_val(train_dir: str | Path, val_dir: str | Path | None, *, skip_bad_images: bool = False,
                   shots: int | None = None) -> tuple[ImageFolderScan, ImageFolderScan | None]:
    """`--train-dir` and `--val-dir` (if given) scanned, with the same classes, and `--shots` checked against the
    class sizes: all before any model is loaded (the run draws its shots later, with its own seed)."""
    train_scan = scan_image_folder(train_dir, "--train-dir", skip_bad_images=skip_bad_images)
    val_scan = None
    if val_dir is not None:
        val_scan = scan_image_folder(val_dir, "--val-dir", skip_bad_images=skip_bad_images)
        if val_scan.classes != train_scan.classes:
            raise ValueError(f"--val-dir classes {val_scan.classes} differ from --train-dir classes "
                             f"{train_scan.classes}; both need the same class sub-folders")
    if shots is not None:
        few_shot_indices(train_scan.targets, shots, seed=0, class_names=train_scan.classes)
    return train_scan, val_scan


def image_folder_dataset(scan: ImageFolderScan, transform: Any) -> Any:
    """torchvision's ImageFolder over the checked samples of `scan` (unreadable ones left out)."""
    from torchvision.datasets import ImageFolder

    good = {os.path.normpath(path) for path, _ in scan.samples}
    dataset = ImageFolder(str(scan.root), transform=transform, is_valid_file=lambda p: os.path.normpath(p) in good,
                          allow_empty=True)
    if dataset.classes != scan.classes:  # both sort the sub-folder names; guard against a folder changing meanwhile
        raise ValueError(f"{scan.root}: classes changed while reading ({scan.classes} vs {dataset.classes})")
    return dataset


def few_shot_indices(targets: Sequence[int], shots: int, seed: int, class_names: Sequence[str] | None = None) -> list[int]:
    """`shots` sample indices per class, drawn reproducibly from `seed`, sorted."""
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be a positive integer, got {shots!r}")
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(int(target), []).append(index)
    chosen = []
    for target in sorted(by_class):
        members = by_class[target]
        if len(members) < shots:
            name = class_names[target] if class_names else target
            raise ValueError(f"--shots {shots}: class {name!r} has only {len(members)} image(s); "
                             "lower --shots or add images")
        generator = torch.Generator().manual_seed(mix_seed(seed, target))
        chosen += [members[i] for i in torch.randperm(len(members), generator=generator)[:shots].tolist()]
    return sorted(chosen)
