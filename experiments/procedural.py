"""Download-free image datasets drawn from formulas, deterministic from a seed (same seed -> same bytes).

Two families, deliberately unlike each other:

* `fractal_dataset` - FractalDB-style pre-training data (Kataoka et al., 2020): every class is an
  iterated function system (IFS) of 2-4 random contractive affine maps, rendered by the chaos game;
  the images of a class differ by a small perturbation of the maps, rotation, scale, position and
  colours. Many classes (hundreds) are cheap, all balanced.
* `shapes_dataset` - a second, different task for transfer: ten geometric shapes (disc, triangle,
  square, pentagon, hexagon, star, cross, ring, crescent, ellipse) at random pose and colours on a
  smooth random background with pixel noise.

Both return `(images, labels)`: images uint8 (N, 3, size, size), labels int64 (N,), `per_class` images
of every class in class order. Everything is computed with numpy from one `numpy.random.Generator`
(PCG64) per call, so a seed fixes the bytes on a given numpy version and platform.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_CHUNK = 512  # images rendered together (fixed: part of what a seed means)
SHAPES = ("disc", "triangle", "square", "pentagon", "hexagon", "star", "cross", "ring", "crescent", "ellipse")


def _check(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def ifs_systems(num_classes: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """One IFS per class: (maps (m, 2, 3) with rows [a b e; c d f], probabilities (m,)).

    Each linear part is R(a) diag(s1, s2) R(b) (optionally mirrored) with 0.3 <= s2 <= s1 <= 0.8: contractive
    (the chaos game converges) and never squashed to a line; probabilities follow |det|.
    """
    _check("num_classes", num_classes, 1)
    rng = np.random.Generator(np.random.PCG64(seed))

    def rotation(angle: float) -> np.ndarray:
        return np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])

    systems = []
    for _ in range(num_classes):
        m = int(rng.integers(2, 5))
        maps = np.zeros((m, 2, 3))
        for k in range(m):
            s1 = rng.uniform(0.4, 0.8)
            s2 = rng.uniform(0.3, s1)
            mirror = np.diag([1.0, rng.choice([-1.0, 1.0])])
            linear = rotation(rng.uniform(0, 2 * math.pi)) @ np.diag([s1, s2]) @ mirror @ rotation(rng.uniform(0, 2 * math.pi))
            maps[k] = np.concatenate([linear, rng.uniform(-1.0, 1.0, size=(2, 1))], axis=1)
        dets = np.abs(np.linalg.det(maps[:, :, :2]))
        systems.append((maps, dets / dets.sum()))
    return systems


def _rasterize(points: np.ndarray, size: int) -> np.ndarray:
    """Point clouds (N, P, 2) in [0, 1)^2 -> hit counts (N, size, size)."""
    n = points.shape[0]
    cells = np.clip((points * size).astype(np.int64), 0, size - 1)
    flat = (np.arange(n)[:, None] * size + cells[..., 1]) * size + cells[..., 0]
    return np.bincount(flat.ravel(), minlength=n * size * size).reshape(n, size, size)


def _colourize(density: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Density (N, H, W) in [0, 1] -> uint8 RGB images with a random foreground and dark background each."""
    n = density.shape[0]
    fg = rng.uniform(0.35, 1.0, size=(n, 3, 1, 1))
    bg = rng.uniform(0.0, 0.3, size=(n, 3, 1, 1))
    image = bg + (fg - bg) * density[:, None]
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def _pose(rng: np.random.Generator, n: int, scale: tuple[float, float]) -> tuple[np.ndarray, ...]:
    """Random rotation angle, scale and centre offset per image."""
    return (rng.uniform(0, 2 * math.pi, n), rng.uniform(*scale, n), rng.uniform(-0.12, 0.12, (n, 2)))


def render_ifs(systems, labels: np.ndarray, size: int, rng: np.random.Generator,
               points: int = 512, iterations: int = 12) -> np.ndarray:
    """Render one image per label by the chaos game, with per-image perturbation and pose."""
    n = len(labels)
    width = max(len(s[0]) for s in systems)
    maps = np.zeros((n, width, 2, 3))
    cum = np.ones((n, width))
    for i, label in enumerate(labels):
        base, probs = systems[label]
        maps[i, : len(base)] = base * rng.uniform(0.92, 1.08, size=base.shape)  # intra-class variation
        cum[i, : len(probs)] = np.cumsum(probs)
    x = rng.uniform(-0.5, 0.5, size=(n, points, 2))
    trail = []
    coef = maps.reshape(n, width, 6)
    for t in range(iterations):
        pick = (rng.random((n, points))[..., None] > cum[:, None, :]).sum(-1).clip(max=width - 1)
        a, b, e, c, d, f = np.moveaxis(np.take_along_axis(coef[:, None], pick[..., None, None], axis=2)[:, :, 0], -1, 0)
        x = np.stack([a * x[..., 0] + b * x[..., 1] + e, c * x[..., 0] + d * x[..., 1] + f], -1)
        if t >= 4:  # the first steps are still far from the attractor
            trail.append(x)
    cloud = np.concatenate(trail, axis=1)
    # Normalise each attractor to the unit box, then rotate, scale and shift it.
    lo, hi = np.percentile(cloud, 1, axis=1, keepdims=True), np.percentile(cloud, 99, axis=1, keepdims=True)
    cloud = (cloud - (lo + hi) / 2) / (hi - lo).max(-1, keepdims=True).clip(min=1e-6)
    angle, scale, shift = _pose(rng, n, (0.7, 0.95))
    rot = np.stack([np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)], -1).reshape(n, 1, 2, 2)
    cloud = (cloud @ rot[:, 0].transpose(0, 2, 1)) * scale[:, None, None] + 0.5 + shift[:, None]
    counts = _rasterize(cloud, size)
    return _colourize(1.0 - np.exp(-counts / 3.0), rng)


def _fractal_chunk(systems, labels: np.ndarray, size: int, seed: int, index: int) -> np.ndarray:
    # Each fixed-size chunk has its own generator, so the bytes do not depend on how chunks are scheduled.
    return render_ifs(systems, labels, size, np.random.Generator(np.random.PCG64([seed, 1, index])))


def fractal_dataset(num_classes: int = 100, per_class: int = 100, size: int = 32, seed: int = 0,
                    workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`num_classes` IFS classes x `per_class` images, uint8 (N, 3, size, size), balanced, class order.

    `workers` > 0 renders chunks in that many processes; the result is the same bytes either way.
    """
    for name, value, minimum in (("per_class", per_class, 1), ("size", size, 8), ("workers", workers, 0)):
        _check(name, value, minimum)
    systems = ifs_systems(num_classes, seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    chunks = [(systems, labels[i:i + _CHUNK], size, seed, i // _CHUNK) for i in range(0, len(labels), _CHUNK)]
    if workers:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_fractal_chunk, *zip(*chunks)))
    else:
        parts = [_fractal_chunk(*chunk) for chunk in chunks]
    return torch.from_numpy(np.concatenate(parts)), torch.from_numpy(labels)


def _shape_masks(kind: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Binary masks (N, size, size) of the shapes `kind` (indices into SHAPES) at random poses."""
    n = len(kind)
    angle, scale, shift = _pose(rng, n, (0.22, 0.36))
    grid = (np.arange(size) + 0.5) / size
    gx = grid[None, None, :] - 0.5 - shift[:, 0, None, None]
    gy = grid[None, :, None] - 0.5 - shift[:, 1, None, None]
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u, v = (c * gx + s * gy) / scale[:, None, None], (-s * gx + c * gy) / scale[:, None, None]
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    masks = np.zeros((n, size, size), dtype=bool)
    sides = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}
    for index, name in enumerate(SHAPES):
        sel = kind == index
        if not sel.any():
            continue
        rr, tt, uu, vv = r[sel], theta[sel], u[sel], v[sel]
        if name in sides:  # regular polygon: radius of the boundary in polar form
            k = sides[name]
            edge = math.cos(math.pi / k) / np.cos((tt % (2 * math.pi / k)) - math.pi / k)
            masks[sel] = rr <= edge
        elif name == "star":
            phase = np.abs((tt % (2 * math.pi / 5)) - math.pi / 5) / (math.pi / 5)
            masks[sel] = rr <= 0.45 + 0.55 * (1 - phase)
        elif name == "cross":
            masks[sel] = ((np.abs(uu) < 0.3) & (np.abs(vv) < 1)) | ((np.abs(vv) < 0.3) & (np.abs(uu) < 1))
        elif name == "ring":
            masks[sel] = (rr <= 1) & (rr >= 0.6)
        elif name == "crescent":
            masks[sel] = (rr <= 1) & (np.hypot(uu - 0.45, vv) > 0.8)
        elif name == "ellipse":
            masks[sel] = (uu / 1.1) ** 2 + (vv / 0.5) ** 2 <= 1
        else:  # disc
            masks[sel] = rr <= 0.9
    return masks


def shapes_dataset(per_class: int = 100, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The ten `SHAPES` x `per_class` images, uint8 (N, 3, size, size), balanced, class order."""
    _check("per_class", per_class, 1)
    _check("size", size, 8)
    rng = np.random.Generator(np.random.PCG64([seed, 2]))
    labels = np.repeat(np.arange(len(SHAPES)), per_class)
    masks = _shape_masks(labels, size, rng).astype(np.float64)
    n = len(labels)
    # Smooth random background (a coarse noise field upsampled) so the shape is not the only structure.
    coarse = rng.uniform(0.0, 0.55, size=(n, 3, 4, 4))
    background = coarse.repeat(size // 4 + 1, 2).repeat(size // 4 + 1, 3)[:, :, :size, :size]
    fg = rng.uniform(0.3, 1.0, size=(n, 3, 1, 1))
    image = background * (1 - masks[:, None]) + fg * masks[:, None] + rng.normal(0, 0.06, size=(n, 3, size, size))
    images = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    return torch.from_numpy(images), torch.from_numpy(labels)


def digits_dataset(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled handwritten digits (1797 real 8x8 images, no download), upsampled to uint8 RGB."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("the digits task needs scikit-learn: pip install 'serial-lora[train]'") from err
    digits = load_digits()
    x = torch.from_numpy(digits.images).float()[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return images, torch.from_numpy(digits.target).long()


def save_preview(images: torch.Tensor, labels: torch.Tensor, path, per_row: int = 10) -> None:
    """A PNG grid of the first image of each class (for the documentation)."""
    from PIL import Image

    classes = labels.unique()[: per_row * 4]
    firsts = torch.stack([images[(labels == c).nonzero()[0, 0]] for c in classes])
    rows = math.ceil(len(firsts) / per_row)
    pad = torch.zeros(rows * per_row - len(firsts), *firsts.shape[1:], dtype=torch.uint8)
    grid = torch.cat([firsts, pad]).reshape(rows, per_row, *firsts.shape[1:])
    grid = grid.permute(0, 3, 1, 4, 2).reshape(rows * firsts.shape[2], per_row * firsts.shape[3], 3)
    Image.fromarray(grid.numpy()).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)
