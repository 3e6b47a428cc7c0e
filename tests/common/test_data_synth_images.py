"""Synthetic imaging: MedMNIST format, determinism, real scanner shift, learnable classes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedmeta.common.data.images import load_npz_site, read_medmnist_npz
from fedmeta.common.data.site_config import ImageSiteConfig, load_site_config
from fedmeta.common.data.synth_images import (
    CLASSES,
    Scanner,
    acquire,
    draw_scanners,
    gaussian_blur,
    write_synth_images,
)
from fedmeta.common.errors import DataError


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    out = tmp_path_factory.mktemp("img")
    return out, write_synth_images(
        out, sites=3, seed=1, train_per_class=12, val_per_class=2, test_per_class=6
    )


def test_medmnist_format_and_counts(sites) -> None:
    out, paths = sites
    assert len(CLASSES) >= 10
    with np.load(paths[0].parent / "images.npz") as z:
        assert sorted(z.files) == sorted(
            f"{s}_{p}" for s in ("train", "val", "test") for p in ("images", "labels")
        )
        assert z["train_images"].shape == (12 * 12, 28, 28)
        assert z["train_images"].dtype == np.uint8
        assert z["train_labels"].shape == (144, 1)
        assert np.bincount(z["test_labels"][:, 0]).tolist() == [6] * 12
    config = load_site_config(paths[0])
    assert isinstance(config, ImageSiteConfig) and config.classes == CLASSES
    site = load_npz_site(config.path, name="s", classes=config.classes)
    assert site.x_train.shape == (12 * 14, 1, 28, 28)
    record = json.loads((out / "generator.json").read_text())
    assert [s["name"] for s in record["sites"]] == ["site-01", "site-02", "site-03"]


def test_deterministic(sites, tmp_path) -> None:
    _, paths = sites
    again = write_synth_images(
        tmp_path, sites=3, seed=1, train_per_class=12, val_per_class=2, test_per_class=6
    )
    a = read_medmnist_npz(paths[2].parent / "images.npz")
    b = read_medmnist_npz(again[2].parent / "images.npz")
    for split in a:
        np.testing.assert_array_equal(a[split][0], b[split][0])


def test_scanners_differ_and_shift_zero_is_identity() -> None:
    ident = draw_scanners(3, seed=0, shift=0.0)
    assert ident[0] == Scanner(gamma=1.0, gain=1.0, offset=0.0, blur_sigma=0.0, noise_sd=0.01)
    varied = draw_scanners(10, seed=0)
    assert np.std([s.gain for s in varied]) > 0.05
    assert max(s.blur_sigma for s in varied) > 0.5


def test_scanner_changes_the_same_anatomy() -> None:
    clean = np.full((2, 16, 16), 0.5)
    rng = np.random.default_rng(0)
    bright = Scanner(gamma=1.0, gain=1.2, offset=0.1, blur_sigma=0.0, noise_sd=0.0)
    out = acquire(clean, bright, rng)
    assert out.dtype == np.uint8
    assert np.all(out == round((1.2 * 0.5 + 0.1) * 255))


def test_gaussian_blur_preserves_mass_and_constants() -> None:
    delta = np.zeros((1, 15, 15))
    delta[0, 7, 7] = 1.0
    blurred = gaussian_blur(delta, 1.0)
    assert blurred.sum() == pytest.approx(1.0)
    assert blurred[0, 7, 7] < 1.0 and blurred[0, 7, 8] == pytest.approx(blurred[0, 8, 7])
    np.testing.assert_allclose(gaussian_blur(np.full((1, 9, 9), 0.3), 2.0), 0.3)


def test_classes_are_learnable_within_a_site(sites) -> None:
    _, paths = sites
    site = load_npz_site(paths[0].parent / "images.npz", name="s")
    xtr = site.x_train.reshape(site.n_train, -1)
    xte = site.x_test.reshape(site.n_test, -1)
    centroids = np.stack([xtr[site.y_train == c].mean(0) for c in range(len(CLASSES))])
    pred = ((xte[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == site.y_test).mean() > 2.0 / len(CLASSES)  # well above chance (1/12)


def test_bad_arguments(tmp_path) -> None:
    with pytest.raises(DataError, match=r"size = 8: must be >= 16"):
        write_synth_images(tmp_path, sites=1, size=8)
    with pytest.raises(DataError, match=r"sites = 0"):
        write_synth_images(tmp_path, sites=0)
