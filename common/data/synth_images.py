"""Seeded synthetic multi-site imaging: small grey lesion/texture images seen through different
scanners.

Twelve classes (so 5-way episodes on novel classes work after holding some classes out), each a
shape or texture drawn at a random position, size, orientation and brightness on a smooth
tissue-like background. Each site has its own *scanner*, applied to every image it produces::

    x_site = clip(blur_sigma(gain * x ** gamma + offset) + noise_sd * N(0, 1), 0, 1)

so the same anatomy looks different at each site (intensity, contrast, blur and noise): a real
site shift, not a relabelling. :func:`write_synth_images` writes what a real site would hold::

    OUT/site-01/images.npz     MedMNIST format: {train,val,test}_{images,labels}, uint8 (n, H, W)
    OUT/site-01/site.yaml      the site's data configuration (kind: images)
    OUT/generator.json         seed and each site's scanner parameters
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedmeta.common.errors import DataError

log = logging.getLogger(__name__)

# Bumped whenever the same arguments would produce different data (names cached folders).
GENERATOR_VERSION = 1

CLASSES: tuple[str, ...] = (
    "normal",
    "round_lesion",
    "ring_lesion",
    "cyst",
    "spiculated_mass",
    "calcifications",
    "streaks",
    "honeycomb",
    "two_nodules",
    "crescent",
    "ground_glass",
    "speckled",
)


@dataclass(frozen=True)
class Scanner:
    """One site's acquisition: gamma (contrast curve), gain, offset, blur and noise levels."""

    gamma: float
    gain: float
    offset: float
    blur_sigma: float
    noise_sd: float


def draw_scanners(n_sites: int, *, seed: int, shift: float = 1.0) -> list[Scanner]:
    """Draw ``n_sites`` scanners; ``shift`` = 0 makes them all the identity."""
    if n_sites < 1 or shift < 0:
        raise DataError(
            f"synth-images: sites = {n_sites}, shift = {shift}: need sites >= 1, shift >= 0"
        )
    rng = np.random.default_rng([seed, 0])
    return [
        Scanner(
            gamma=float(np.exp(shift * rng.normal(0, 0.25))),
            gain=float(np.exp(shift * rng.normal(0, 0.15))),
            offset=float(shift * rng.normal(0, 0.06)),
            blur_sigma=float(shift * rng.uniform(0.0, 1.2)),
            noise_sd=float(0.01 + shift * rng.uniform(0.0, 0.07)),
        )
        for _ in range(n_sites)
    ]


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of ``(n, H, W)`` images (reflected borders); a new array."""
    if sigma <= 0.05:
        return images.copy()
    r = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    out = images
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        padded = np.pad(out, pad, mode="reflect")
        size = out.shape[axis]
        acc = np.zeros_like(out, dtype=np.float64)
        for j, w in enumerate(k):
            acc += w * np.take(padded, np.arange(j, j + size), axis=axis)
        out = acc
    return out


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(
        np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij"
    )


def _draw(cls: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One clean image of class ``cls`` in [0, 1], ``(size, size)``."""
    yy, xx = _grid(size)
    base = 0.3 + 0.1 * rng.random()
    bg = gaussian_blur(rng.normal(0, 1, (1, size, size)), 2.0)[0]
    img = base + 0.09 * bg / (bg.std() + 1e-9)
    m = size / 2
    cy, cx = m + rng.uniform(-0.15, 0.15, 2) * size
    rad = size * rng.uniform(0.14, 0.22)
    dist = np.hypot(yy - cy, xx - cx)
    theta = rng.uniform(0, np.pi)
    amp = rng.uniform(0.3, 0.45)

    def disk(y: float, x: float, radius: float) -> np.ndarray:
        return 1 / (1 + np.exp((np.hypot(yy - y, xx - x) - radius) / 0.7))

    name = CLASSES[cls]
    if name == "round_lesion":
        img += amp * disk(cy, cx, rad)
    elif name == "ring_lesion":
        img += amp * np.exp(-0.5 * ((dist - rad) / 1.0) ** 2)
    elif name == "cyst":
        img -= 0.6 * base * disk(cy, cx, rad)
    elif name == "spiculated_mass":
        ang = np.arctan2(yy - cy, xx - cx)
        spikes = np.cos(7 * (ang + theta)) > 0.75
        img += amp * np.maximum(disk(cy, cx, rad * 0.6), spikes * (dist < rad * 1.6) * 0.8)
    elif name == "calcifications":
        for _ in range(int(rng.integers(5, 9))):
            oy, ox = rng.normal(0, size * 0.1, 2)
            img += 0.6 * np.exp(-0.5 * (np.hypot(yy - cy - oy, xx - cx - ox) / 0.6) ** 2)
    elif name == "streaks":
        proj = (yy - cy) * np.cos(theta) + (xx - cx) * np.sin(theta)
        img += 0.5 * amp * (np.cos(2 * np.pi * proj / rng.uniform(4, 6)) > 0.6)
    elif name == "honeycomb":
        period = rng.uniform(5, 7)
        cells = np.cos(2 * np.pi * yy / period) * np.cos(2 * np.pi * (xx + theta * 3) / period)
        img += 0.5 * amp * (np.abs(cells) < 0.25)
    elif name == "two_nodules":
        off = size * 0.22
        dy, dx = off * np.cos(theta), off * np.sin(theta)
        img += amp * (disk(cy + dy, cx + dx, rad * 0.5) + disk(cy - dy, cx - dx, rad * 0.5))
    elif name == "crescent":
        sy, sx = 0.5 * rad * np.cos(theta), 0.5 * rad * np.sin(theta)
        img += amp * np.clip(disk(cy, cx, rad) - disk(cy + sy, cx + sx, rad * 0.9), 0, 1)
    elif name == "ground_glass":
        img += 0.6 * amp * np.exp(-0.5 * (dist / (rad * 1.5)) ** 2)
    elif name == "speckled":
        spots = rng.random((size, size)) < 0.08
        img -= 0.25 * gaussian_blur(spots[None].astype(float), 0.6)[0] * 3
    return np.clip(img, 0, 1)


def simulate_site(
    scanner: Scanner, counts: dict[str, int], *, size: int, seed: int, site_index: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Images of one site: split -> (uint8 ``(n, size, size)``, labels uint8 ``(n, 1)``), with
    ``counts[split]`` images per class in each split, in random order."""
    rng = np.random.default_rng([seed, 1, site_index])
    out = {}
    for split, per_class in counts.items():
        labels = np.repeat(np.arange(len(CLASSES)), per_class)
        labels = labels[rng.permutation(labels.size)]
        clean = (
            np.stack([_draw(int(c), size, rng) for c in labels])
            if labels.size
            else np.zeros((0, size, size))
        )
        out[split] = (acquire(clean, scanner, rng), labels.astype(np.uint8)[:, None])
    return out


def acquire(clean: np.ndarray, scanner: Scanner, rng: np.random.Generator) -> np.ndarray:
    """Apply ``scanner`` to clean ``(n, H, W)`` images in [0, 1]; returns uint8."""
    x = scanner.gain * np.clip(clean, 0, 1) ** scanner.gamma + scanner.offset
    x = gaussian_blur(x, scanner.blur_sigma) + scanner.noise_sd * rng.normal(0, 1, x.shape)
    return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


def write_synth_images(
    out_dir: str | Path,
    *,
    sites: int,
    seed: int = 0,
    size: int = 28,
    train_per_class: int = 30,
    val_per_class: int = 5,
    test_per_class: int = 15,
    shift: float = 1.0,
    progress: Callable[[str], None] | None = None,
) -> list[Path]:
    """Generate ``sites`` sites into ``out_dir`` (layout in the module docstring); return the
    site YAML paths. Same arguments, same bytes."""
    if size < 16:
        raise DataError(f"synth-images: size = {size}: must be >= 16")
    if min(train_per_class, test_per_class) < 1 or val_per_class < 0:
        raise DataError("synth-images: train and test need at least 1 image per class")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scanners = draw_scanners(sites, seed=seed, shift=shift)
    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    paths = []
    for k, scanner in enumerate(scanners):
        name = f"site-{k + 1:02d}"
        site_dir = out / name
        site_dir.mkdir(exist_ok=True)
        data = simulate_site(scanner, counts, size=size, seed=seed, site_index=k)
        arrays: dict[str, Any] = {}
        for split, (x, y) in data.items():
            arrays[f"{split}_images"] = x
            arrays[f"{split}_labels"] = y
        np.savez_compressed(site_dir / "images.npz", **arrays)
        (site_dir / "site.yaml").write_text(
            yaml.safe_dump(
                {"kind": "images", "name": name, "path": "images.npz", "classes": list(CLASSES)},
                sort_keys=False,
            )
        )
        paths.append(site_dir / "site.yaml")
        log.info(
            "synth-images: %s: %d train / %d val / %d test images, scanner %s",
            name,
            len(data["train"][1]),
            len(data["val"][1]),
            len(data["test"][1]),
            scanner,
        )
        if progress is not None:
            progress(name)
    (out / "generator.json").write_text(
        json.dumps(
            {
                "generator": "fedmeta synth-images",
                "version": GENERATOR_VERSION,
                "n_sites": sites,
                "seed": seed,
                "size": size,
                "classes": list(CLASSES),
                "per_class": counts,
                "shift": shift,
                "sites": [
                    {"name": f"site-{k + 1:02d}", **asdict(s)} for k, s in enumerate(scanners)
                ],
            },
            indent=1,
        )
    )
    return paths
