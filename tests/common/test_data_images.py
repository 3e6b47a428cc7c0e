"""Image readers (MedMNIST .npz, class folders), class splits and every bad input."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedmeta.common.data.images import (
    check_n_way_k_shot,
    load_folder_site,
    load_npz_site,
    npz_image_shape,
    read_medmnist_npz,
    restrict_classes,
    split_classes,
)
from fedmeta.common.errors import DataError


def _npz(path: Path, *, rgb: bool = False, flat_labels: bool = False, **replace) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 3), ("test", 6)):
        shape = (n, 8, 8, 3) if rgb else (n, 8, 8)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape).astype(np.uint8)
        labels = (np.arange(n) % 3).astype(np.uint8)
        arrays[f"{split}_labels"] = labels if flat_labels else labels[:, None]
    for k, v in replace.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    np.savez(path, **arrays)
    return path


def test_grey_npz(tmp_path) -> None:
    path = _npz(tmp_path / "a.npz")
    raw = np.load(path)
    site = load_npz_site(path, name="s", classes=["a", "b", "c"])
    assert site.x_train.shape == (15, 1, 8, 8)  # train + val
    assert site.x_test.shape == (6, 1, 8, 8)
    assert site.x_train.dtype == np.float32 and site.y_train.dtype == np.int64
    np.testing.assert_allclose(site.x_train[0, 0], raw["train_images"][0] / 255.0, rtol=1e-6)
    assert np.bincount(site.y_train).tolist() == [5, 5, 5]
    assert site.classes == ("a", "b", "c")
    assert load_npz_site(path, name="s", use_val=False).n_train == 12
    assert npz_image_shape(path) == (1, 8, 8)


def test_rgb_npz_and_flat_labels(tmp_path) -> None:
    path = _npz(tmp_path / "rgb.npz", rgb=True, flat_labels=True)
    raw = np.load(path)
    splits = read_medmnist_npz(path)
    x, y = splits["train"]
    assert x.shape == (12, 3, 8, 8) and y.shape == (12,)
    np.testing.assert_allclose(x[2, 1], raw["train_images"][2, :, :, 1] / 255.0, rtol=1e-6)
    assert npz_image_shape(path) == (3, 8, 8)
    assert load_npz_site(path, name="s").classes == ("0", "1", "2")


@pytest.mark.parametrize(
    ("replace", "message"),
    [
        ({"train_labels": None}, r"key 'train_labels' is missing"),
        ({"extra": np.zeros(3)}, r"unexpected key\(s\) \['extra'\]"),
        ({"val_labels": None}, r"has only one of 'val_images' and 'val_labels'"),
        ({"train_images": np.zeros((12, 8), np.uint8)}, r"train_images has shape \(12, 8\)"),
        (
            {"test_images": np.zeros((6, 8, 8, 2), np.uint8)},
            r"test_images has shape \(6, 8, 8, 2\)",
        ),
        (
            {"train_labels": np.zeros((12, 14), np.uint8)},
            r"train_labels has shape \(12, 14\).*multi-label",
        ),
        (
            {"train_labels": np.zeros(11, np.uint8)},
            r"train_labels has 11 labels but the images hold 12",
        ),
        ({"test_images": np.zeros((6, 9, 9), np.uint8)}, r"test_images have shape \(1, 9, 9\)"),
        ({"train_images": np.full((12, 8, 8), 2.0)}, r"train_images holds float values outside"),
        ({"val_labels": np.full((3, 1), -1)}, r"val_labels holds a negative label -1"),
    ],
)
def test_bad_npz(tmp_path, replace: dict, message: str) -> None:
    path = _npz(tmp_path / "bad.npz", **replace)
    with pytest.raises(DataError, match=r"bad\.npz: " + message):
        read_medmnist_npz(path)


def test_missing_and_empty_npz(tmp_path) -> None:
    with pytest.raises(DataError, match=r"none\.npz: image file not found"):
        read_medmnist_npz(tmp_path / "none.npz")
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.npz: image file is empty"):
        read_medmnist_npz(tmp_path / "empty.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"junk\.npz: not a readable \.npz"):
        read_medmnist_npz(tmp_path / "junk.npz")


def test_too_few_class_names(tmp_path) -> None:
    with pytest.raises(DataError, match=r"labels go up to 2 but only 2 class names"):
        load_npz_site(_npz(tmp_path / "a.npz"), name="s", classes=["a", "b"])


def _folder(root: Path, sizes: dict[str, int], *, shape=(10, 12), fmt: str = "PNG") -> Path:
    for k, (cls, n) in enumerate(sizes.items()):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            pixels = np.full(shape, 20 * k + i, dtype=np.uint8)
            ext = "png" if fmt == "PNG" else "jpg"
            Image.fromarray(pixels).save(root / cls / f"img{i}.{ext}", format=fmt)
    return root


def test_image_folder_png(tmp_path) -> None:
    root = _folder(tmp_path / "imgs", {"benign": 6, "malignant": 4})
    site = load_folder_site(root, name="s", test_fraction=0.5, seed=0)
    assert site.classes == ("benign", "malignant")
    assert site.x_train.shape[1:] == (1, 10, 12)
    # stratified: 6 -> 3 test, 4 -> 2 test
    assert np.bincount(site.y_test).tolist() == [3, 2]
    assert np.bincount(site.y_train).tolist() == [3, 2]
    # pixel value of malignant img{i} is 20 + i
    assert set(np.round(site.x_train[site.y_train == 1, 0, 0, 0] * 255).astype(int)) <= {
        20,
        21,
        22,
        23,
    }


def test_image_folder_jpeg_resize_rgb(tmp_path) -> None:
    root = _folder(tmp_path / "imgs", {"a": 2, "b": 2}, fmt="JPEG")
    site = load_folder_site(root, name="s", test_fraction=0.5, seed=0, size=(6, 7), grayscale=False)
    assert site.x_train.shape == (2, 3, 6, 7)


def test_image_folder_bad_inputs(tmp_path) -> None:
    with pytest.raises(DataError, match=r"nothere: image folder not found"):
        load_folder_site(tmp_path / "nothere", name="s")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match=r"flat: no class folders"):
        load_folder_site(tmp_path / "flat", name="s")
    root = _folder(tmp_path / "mixed", {"a": 2, "b": 2})
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "b" / "z.png")
    with pytest.raises(
        DataError, match=r"z\.png: image is \(5, 5\).*earlier images are \(10, 12\)"
    ):
        load_folder_site(root, name="s")
    root = _folder(tmp_path / "emptyclass", {"a": 2})
    (root / "b").mkdir()
    with pytest.raises(DataError, match=r"class folder 'b' holds no image"):
        load_folder_site(root, name="s")
    root = _folder(tmp_path / "broken", {"a": 2})
    (root / "a" / "bad.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"bad\.png: not a readable image"):
        load_folder_site(root, name="s")


@pytest.mark.skipif(importlib.util.find_spec("pydicom") is not None, reason="pydicom installed")
def test_dicom_needs_pydicom(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.dcm").write_bytes(b"DICM")
    with pytest.raises(DataError, match=r"x\.dcm: reading DICOM needs pydicom"):
        load_folder_site(tmp_path, name="s")


def test_class_split_and_restrict(tmp_path) -> None:
    base, novel = split_classes(12, n_novel=5, seed=0)
    assert len(novel) == 5 and len(base) == 7
    assert set(base).isdisjoint(novel) and set(base) | set(novel) == set(range(12))
    assert split_classes(12, n_novel=5, seed=0) == (base, novel)
    with pytest.raises(DataError, match=r"novel classes = 12"):
        split_classes(12, n_novel=12, seed=0)
    site = load_npz_site(_npz(tmp_path / "a.npz"), name="s", classes=["a", "b", "c"])
    only = restrict_classes(site, [2, 0], suffix="/novel")
    assert only.name == "s/novel" and only.classes == ("c", "a")
    assert only.n_train == 10 and set(only.y_train.tolist()) == {0, 1}
    np.testing.assert_array_equal(only.x_train[only.y_train == 0], site.x_train[site.y_train == 2])


def test_check_n_way_k_shot(tmp_path) -> None:
    site = load_npz_site(_npz(tmp_path / "a.npz"), name="s")  # 5 training images per class
    check_n_way_k_shot(site, ways=3, shots=2, query=3)
    with pytest.raises(
        DataError,
        match=r"site\.yaml: site 's': an episode needs 2 shots \+ 4 queries = 6 training images "
        r"per class, but 3 class\(es\) have fewer \(0: 5, 1: 5, 2: 5\)",
    ):
        check_n_way_k_shot(site, ways=3, shots=2, query=4, source="site.yaml")
    with pytest.raises(DataError, match=r"a 4-way episode needs 4 classes, but the site has 3"):
        check_n_way_k_shot(site, ways=4, shots=1, query=1)
