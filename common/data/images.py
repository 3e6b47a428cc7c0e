"""Medical image readers: MedMNIST ``.npz`` files and image folders (one folder per class).

MedMNIST format (Yang et al. 2023, "MedMNIST v2", Scientific Data 10:41): an ``.npz`` with
``train_images``, ``train_labels``, ``val_images``, ``val_labels``, ``test_images``,
``test_labels``; images uint8 ``(n, H, W)`` (grey) or ``(n, H, W, 3)`` (RGB), labels ``(n, 1)``
or ``(n,)`` integer class indices. Multi-label files (ChestMNIST: ``(n, 14)``) are not
classification tasks of this kind and are refused.

Everything becomes an :class:`ImageSite`: float32 ``(n, C, H, W)`` in ``[0, 1]`` and int64 labels.
For few-shot learning, :func:`split_classes` keeps meta-training classes apart from novel classes
and :func:`restrict_classes` keeps a site's images of some classes only, relabelled ``0..k-1``.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedmeta.common.config import DataConfig
from fedmeta.common.data.base import ImageSite
from fedmeta.common.data.cache import cache_root, ensure_generated
from fedmeta.common.data.episodes import split_classes
from fedmeta.common.data.partition import stratified_split
from fedmeta.common.data.registry import DataSpec, Source, register_source
from fedmeta.common.data.site_config import ImageSiteConfig, find_site_configs
from fedmeta.common.data.synth_images import GENERATOR_VERSION, write_synth_images
from fedmeta.common.errors import ConfigError, DataError

log = logging.getLogger(__name__)

NPZ_SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom")


def to_nchw(images: np.ndarray, *, source: str, key: str) -> np.ndarray:
    """``(n, H, W)`` or ``(n, H, W, C)`` (C = 1 or 3), uint8 or float in [0, 1] -> float32
    ``(n, C, H, W)`` in [0, 1]. Other shapes, dtypes or ranges raise, naming ``source``/``key``."""
    if images.ndim == 3:
        x = images[:, None, :, :]
    elif images.ndim == 4 and images.shape[-1] in (1, 3):
        x = np.moveaxis(images, -1, 1)
    else:
        raise DataError(
            f"{source}: {key} has shape {images.shape}; expected (n, H, W) grey or (n, H, W, 3) "
            "RGB images"
        )
    if x.shape[0] > 0 and min(x.shape[2:]) < 2:
        raise DataError(f"{source}: {key} has shape {images.shape}: images must be at least 2x2")
    if images.dtype == np.uint8:
        return (x.astype(np.float32) / 255.0).astype(np.float32)
    if np.issubdtype(images.dtype, np.floating):
        if x.size and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise DataError(
                f"{source}: {key} holds float values outside [0, 1] (or NaN); store "
                "uint8 0-255 or floats in [0, 1]"
            )
        return x.astype(np.float32)
    raise DataError(f"{source}: {key} has dtype {images.dtype}; expected uint8 (0-255) or float")


def _labels(raw: np.ndarray, n: int, *, source: str, key: str) -> np.ndarray:
    """``(n,)`` or ``(n, 1)`` non-negative integer labels -> int64 ``(n,)``."""
    if raw.ndim == 2 and raw.shape[1] == 1:
        raw = raw[:, 0]
    if raw.ndim != 1:
        raise DataError(
            f"{source}: {key} has shape {raw.shape}; expected (n,) or (n, 1) class indices "
            "(multi-label files such as ChestMNIST are not supported)"
        )
    if raw.shape[0] != n:
        raise DataError(f"{source}: {key} has {raw.shape[0]} labels but the images hold {n}")
    if not np.issubdtype(raw.dtype, np.integer):
        if not (np.issubdtype(raw.dtype, np.floating) and np.all(np.mod(raw, 1) == 0)):
            raise DataError(f"{source}: {key} has dtype {raw.dtype}; expected integer classes")
    y = raw.astype(np.int64)
    if y.size and y.min() < 0:
        raise DataError(
            f"{source}: {key} holds a negative label {int(y.min())} at index {int(np.argmin(y))}"
        )
    return y


def read_medmnist_npz(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read a MedMNIST-format file: split name -> (float32 ``(n, C, H, W)``, int64 ``(n,)``).

    ``train_*`` and ``test_*`` are required, ``val_*`` optional; an ``x_images`` without its
    ``x_labels`` (or the reverse), an unknown key, or splits of different image size raise.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: image file not found. Hint: check 'path' in the site YAML.")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: image file is empty (0 bytes)")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{p}: not a readable .npz file: {e}") from e
    allowed = {f"{s}_{part}" for s in NPZ_SPLITS for part in ("images", "labels")}
    unknown = sorted(set(arrays) - allowed)
    if unknown:
        raise DataError(
            f"{p}: unexpected key(s) {unknown}; a MedMNIST file holds {sorted(allowed)}"
        )
    for required in ("train_images", "train_labels", "test_images", "test_labels"):
        if required not in arrays:
            raise DataError(
                f"{p}: key {required!r} is missing (keys: {sorted(arrays)}); a "
                "MedMNIST file needs train_* and test_*, val_* is optional"
            )
    if ("val_images" in arrays) != ("val_labels" in arrays):
        raise DataError(f"{p}: has only one of 'val_images' and 'val_labels'")
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    shape: tuple[int, ...] | None = None
    for split in NPZ_SPLITS:
        if f"{split}_images" not in arrays:
            continue
        x = to_nchw(arrays[f"{split}_images"], source=str(p), key=f"{split}_images")
        y = _labels(arrays[f"{split}_labels"], x.shape[0], source=str(p), key=f"{split}_labels")
        if shape is not None and x.shape[1:] != shape:
            raise DataError(
                f"{p}: {split}_images have shape {x.shape[1:]} per image, train has {shape}"
            )
        shape = x.shape[1:]
        out[split] = (x, y)
    if out["train"][0].shape[0] == 0:
        raise DataError(f"{p}: train_images holds no image")
    return out


def _class_names(n_classes: int, classes: Sequence[str] | None, source: str) -> tuple[str, ...]:
    if classes is None:
        return tuple(str(k) for k in range(n_classes))
    if len(classes) < n_classes:
        raise DataError(
            f"{source}: labels go up to {n_classes - 1} but only {len(classes)} class "
            f"names are given ({list(classes)})"
        )
    return tuple(classes)


def load_npz_site(
    path: str | Path, *, name: str, classes: Sequence[str] | None = None, use_val: bool = True
) -> ImageSite:
    """An :class:`ImageSite` from a MedMNIST file; ``val_*`` joins training when ``use_val``."""
    splits = read_medmnist_npz(path)
    x_tr, y_tr = splits["train"]
    if use_val and "val" in splits:
        x_tr = np.concatenate([x_tr, splits["val"][0]])
        y_tr = np.concatenate([y_tr, splits["val"][1]])
    x_te, y_te = splits["test"]
    n_classes = int(max(y_tr.max(initial=-1), y_te.max(initial=-1))) + 1
    names = _class_names(n_classes, classes, str(path))
    log.info(
        "site %s: %d train / %d test images %s, %d classes from %s",
        name,
        len(y_tr),
        len(y_te),
        x_tr.shape[1:],
        len(names),
        path,
    )
    return ImageSite(name, x_tr, y_tr, x_te, y_te, names)


def _read_one(path: Path, *, size: tuple[int, int] | None, grayscale: bool) -> np.ndarray:
    """One image file as float32 ``(C, H, W)`` in [0, 1]."""
    from fedmeta.common import extras

    extras.require("images")
    from PIL import Image
    if path.suffix.lower() in DICOM_SUFFIXES:
        try:
            import pydicom
        except ImportError as e:
            raise DataError(
                f"{path}: reading DICOM needs pydicom (pip install 'fedmeta[dicom]')"
            ) from e
        try:
            pixels = np.asarray(pydicom.dcmread(path).pixel_array, dtype=np.float64)
        except Exception as e:  # pydicom raises many types for a malformed file
            raise DataError(f"{path}: not a readable DICOM image: {e}") from e
        lo, hi = float(pixels.min()), float(pixels.max())
        scaled = (pixels - lo) / (hi - lo) if hi > lo else np.zeros_like(pixels)
        img = Image.fromarray(np.round(scaled * 255).astype(np.uint8))
    else:
        try:
            img = Image.open(path)
            img.load()
        except OSError as e:
            raise DataError(f"{path}: not a readable image: {e}") from e
    img = img.convert("L" if grayscale else "RGB")
    if size is not None:
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)


def read_image_folder(
    root: str | Path, *, size: tuple[int, int] | None = None, grayscale: bool = True
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Read ``root/<class>/<image>`` files (PNG, JPEG; DICOM with pydicom).

    Classes are the sub-folder names in sorted order. Without ``size`` every image must have the
    same size (the first differing file is named). Returns images float32 ``(n, C, H, W)``,
    labels int64 ``(n,)`` and the class names.
    """
    r = Path(root)
    if not r.is_dir():
        raise DataError(f"{r}: image folder not found")
    class_dirs = sorted(d for d in r.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{r}: no class folders; expected one sub-folder per class")
    images: list[np.ndarray] = []
    labels: list[int] = []
    for k, d in enumerate(class_dirs):
        files = sorted(
            f
            for f in d.iterdir()
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES + DICOM_SUFFIXES
        )
        if not files:
            raise DataError(
                f"{d}: class folder {d.name!r} holds no image "
                f"({', '.join(IMAGE_SUFFIXES + DICOM_SUFFIXES)})"
            )
        for f in files:
            img = _read_one(f, size=size, grayscale=grayscale)
            if images and img.shape != images[0].shape:
                raise DataError(
                    f"{f}: image is {img.shape[1:]} ({img.shape[0]} channel(s)) but "
                    f"earlier images are {images[0].shape[1:]}; set image_size to "
                    "resize them all"
                )
            images.append(img)
            labels.append(k)
    return np.stack(images), np.asarray(labels, dtype=np.int64), tuple(d.name for d in class_dirs)


def load_folder_site(
    root: str | Path,
    *,
    name: str,
    test_fraction: float = 0.34,
    seed: int = 43,
    size: tuple[int, int] | None = None,
    grayscale: bool = True,
) -> ImageSite:
    """An :class:`ImageSite` from an image folder, split per class (stratified, seeded)."""
    x, y, classes = read_image_folder(root, size=size, grayscale=grayscale)
    train, test = stratified_split(y, test_fraction=test_fraction, seed=seed)
    log.info(
        "site %s: %d train / %d test images, %d classes from %s",
        name,
        train.size,
        test.size,
        len(classes),
        root,
    )
    return ImageSite(name, x[train], y[train], x[test], y[test], classes)


def restrict_classes(site: ImageSite, keep: Sequence[int], *, suffix: str = "") -> ImageSite:
    """The site's images of classes ``keep`` only, relabelled ``0..len(keep)-1`` in ``keep``'s
    order; ``suffix`` is appended to the site name (e.g. ``"/novel"``)."""
    keep = list(keep)
    if len(set(keep)) != len(keep) or any(not 0 <= k < site.n_classes for k in keep):
        raise DataError(
            f"site {site.name}: classes {keep} must be distinct indices in [0, {site.n_classes})"
        )
    remap = np.full(site.n_classes, -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    tr = remap[site.y_train] >= 0
    te = remap[site.y_test] >= 0
    return ImageSite(
        site.name + suffix,
        site.x_train[tr],
        remap[site.y_train[tr]],
        site.x_test[te],
        remap[site.y_test[te]],
        tuple(site.classes[k] for k in keep),
    )


def check_n_way_k_shot(
    site: ImageSite, *, ways: int, shots: int, query: int, source: str = ""
) -> None:
    """Raise :class:`DataError` unless the site has at least ``ways`` classes and every class has
    ``shots + query`` training images, so that any N-way K-shot episode over its classes can be
    drawn without repeats (as :class:`fedmeta.common.data.episodes.EpisodeSampler` requires)."""
    need = shots + query
    where = f"{source}: " if source else ""
    hint = "Hint: lower tasks.ways, tasks.support or tasks.query."
    if site.n_classes < ways:
        raise DataError(
            f"{where}site {site.name!r}: a {ways}-way episode needs {ways} classes, but the site "
            f"has {site.n_classes} ({list(site.classes)}). {hint}"
        )
    counts = np.bincount(site.y_train, minlength=site.n_classes)
    short = [
        f"{site.classes[k]}: {int(counts[k])}" for k in range(site.n_classes) if counts[k] < need
    ]
    if short:
        raise DataError(
            f"{where}site {site.name!r}: an episode needs {shots} shots + {query} queries = "
            f"{need} training images per class, but {len(short)} class(es) have fewer "
            f"({', '.join(short)}). {hint}"
        )


def npz_image_shape(path: str | Path) -> tuple[int, ...]:
    """``(C, H, W)`` of ``train_images`` in a MedMNIST file, read from the array header only
    (no pixel is loaded), so the coordinator can size the model without reading site data."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: image file not found. Hint: check 'path' in the site YAML.")
    try:
        with zipfile.ZipFile(p) as z, z.open("train_images.npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, _ = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, _ = np.lib.format.read_array_header_2_0(f)
    except KeyError as e:
        raise DataError(f"{p}: key 'train_images' is missing") from e
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise DataError(f"{p}: not a readable .npz file: {e}") from e
    if len(shape) == 3:
        return (1, int(shape[1]), int(shape[2]))
    if len(shape) == 4 and shape[-1] in (1, 3):
        return (int(shape[3]), int(shape[1]), int(shape[2]))
    raise DataError(f"{p}: train_images has shape {shape}; expected (n, H, W) or (n, H, W, 3)")


def load_image_site(
    config: ImageSiteConfig, *, test_fraction: float = 0.34, seed: int = 43
) -> ImageSite:
    """Load the site a ``kind: images`` site file describes (``.npz`` or class folders)."""
    if config.is_folder:
        site = load_folder_site(
            config.path,
            name=config.name,
            test_fraction=config.test_fraction
            if config.test_fraction is not None
            else test_fraction,
            seed=config.seed if config.seed is not None else seed,
            size=config.image_size,
            grayscale=config.grayscale,
        )
        if config.classes is not None and tuple(config.classes) != site.classes:
            raise DataError(
                f"{config.source}: classes = {list(config.classes)} but the folder "
                f"{config.path} has class folders {list(site.classes)}"
            )
        return site
    return load_npz_site(
        config.path, name=config.name, classes=config.classes, use_val=config.use_val
    )


# --- data sources "images" (a folder of site folders) and "synth-images" (generated, cached) ---


def _image_configs(root: Path) -> list[ImageSiteConfig]:
    configs = find_site_configs(root)
    wrong = [c for c in configs if not isinstance(c, ImageSiteConfig)]
    if wrong:
        raise ConfigError(
            f"{wrong[0].source}: kind = {wrong[0].kind!r}, but data.source "
            "'images' needs every site to be kind: images"
        )
    return [c for c in configs if isinstance(c, ImageSiteConfig)]


def _class_split(
    cfg: DataConfig, classes: Sequence[str]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(meta-training, novel) class indices for the experiment: all classes are meta-training
    classes unless ``data.novel_classes`` > 0."""
    if cfg.novel_classes == 0:
        return tuple(range(len(classes))), ()
    return split_classes(len(classes), n_novel=cfg.novel_classes, seed=cfg.split_seed)


def images_spec_from(root: Path, cfg: DataConfig) -> DataSpec:
    """Shape and sites of an imaging consortium from its site files and array headers.
    ``n_classes`` counts the meta-training classes. Sites must agree on classes and shape."""
    configs = _image_configs(root)
    first = configs[0]
    if first.classes is None:
        raise ConfigError(
            f"{first.source}: key 'classes' is required for data.source 'images' "
            "(the class names, in label order, shared by every site)"
        )
    shape: tuple[int, ...] | None = None
    for c in configs:
        if c.classes != first.classes:
            raise ConfigError(f"{c.source}: classes = {c.classes} differ from {first.source}")
        if c.is_folder:
            if c.image_size is None:
                raise ConfigError(
                    f"{c.source}: an image folder needs 'image_size' in a "
                    "consortium so every site has the same input shape"
                )
            s: tuple[int, ...] = (1 if c.grayscale else 3, *c.image_size)
        else:
            s = npz_image_shape(c.path)
        if shape is not None and s != shape:
            raise ConfigError(f"{c.source}: images are {s}, other sites' are {shape}")
        shape = s
    assert shape is not None
    base, _ = _class_split(cfg, first.classes)
    return DataSpec("images", shape, len(base), tuple(c.name for c in configs))


def _images_load_from(root: Path, cfg: DataConfig, name: str, *, novel: bool = False) -> ImageSite:
    config = {c.name: c for c in _image_configs(root)}[name]
    site = load_image_site(config, test_fraction=cfg.test_fraction, seed=cfg.split_seed)
    base, novel_idx = _class_split(cfg, site.classes)
    if novel:
        if not novel_idx:
            raise ConfigError("data.novel_classes = 0: there are no novel classes to load")
        return restrict_classes(site, novel_idx, suffix="/novel")
    return site if not novel_idx else restrict_classes(site, base)


def _images_root(cfg: DataConfig) -> Path:
    if not cfg.path:
        raise ConfigError(
            "data.path is empty: data.source 'images' needs the folder holding "
            "one sub-folder per site (each with a site.yaml)"
        )
    return Path(cfg.path).expanduser()


def synth_images_root(cfg: DataConfig) -> Path:
    """The synthetic imaging consortium's folder, generated on first use: ``data.path`` if set,
    else ``<cache>/synth-images-v<version>-<sites>sites-seed<seed>``."""
    target = (
        Path(cfg.path).expanduser()
        if cfg.path
        else cache_root()
        / f"synth-images-v{GENERATOR_VERSION}-{cfg.synth_sites}sites-seed{cfg.synth_seed}"
    )
    return ensure_generated(
        target,
        lambda d: write_synth_images(d, sites=cfg.synth_sites, seed=cfg.synth_seed),
        expect={"version": GENERATOR_VERSION, "n_sites": cfg.synth_sites, "seed": cfg.synth_seed},
    )


def _root_for(cfg: DataConfig) -> Path:
    return synth_images_root(cfg) if cfg.source == "synth-images" else _images_root(cfg)


def load_novel_site(cfg: DataConfig, name: str) -> ImageSite:
    """A site's images of the novel classes only (relabelled 0..k-1), for evaluating
    adaptation to classes never seen in meta-training."""
    return _images_load_from(_root_for(cfg), cfg, name, novel=True)


register_source(
    "images",
    Source(
        lambda cfg: images_spec_from(_images_root(cfg), cfg),
        lambda cfg, name: _images_load_from(_images_root(cfg), cfg, name),
        needs=lambda cfg: ("images",),
    ),
)
register_source(
    "synth-images",
    Source(
        lambda cfg: images_spec_from(synth_images_root(cfg), cfg),
        lambda cfg, name: _images_load_from(synth_images_root(cfg), cfg, name),
    ),
)
