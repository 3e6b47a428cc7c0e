"""What a site holds after loading: its own rows, split into training and test parts.

Nothing here leaves the site. The federated client samples tasks from ``x_train``/``y_train`` and
scores adaptation on ``x_test``/``y_test``; only parameter updates and aggregate counts are sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TabularSite:
    """One hospital's encoded tabular cohort.

    ``x_*``: float32 ``(n, d)``, already imputed and scaled with statistics of the training rows.
    ``y_*``: int64 ``(n, O)``, one column per binary outcome in ``outcomes``; -1 = label missing.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    feature_names: tuple[str, ...]
    outcomes: tuple[str, ...]
    #: Source row identifiers of each split (local bookkeeping for audits; never sent).
    row_ids_train: tuple[int, ...] = ()
    row_ids_test: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.ndim != 2 or x.shape[1] != len(self.feature_names):
                raise ValueError(
                    f"site {self.name}: x_{split} has shape {x.shape}, "
                    f"expected (n, {len(self.feature_names)})"
                )
            if y.shape != (x.shape[0], len(self.outcomes)):
                raise ValueError(
                    f"site {self.name}: y_{split} has shape {y.shape}, "
                    f"expected ({x.shape[0]}, {len(self.outcomes)})"
                )

    @property
    def kind(self) -> str:
        return "tabular"

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def n_classes(self) -> int:
        return 2

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])


@dataclass(frozen=True)
class ImageSite:
    """One site's images: float32 ``(n, C, H, W)`` in [0, 1]; labels int64 ``(n,)`` into ``classes``."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.ndim != 4:
                raise ValueError(f"site {self.name}: x_{split} has shape {x.shape}, expected (n, C, H, W)")
            if y.shape != (x.shape[0],):
                raise ValueError(f"site {self.name}: y_{split} has shape {y.shape}, expected ({x.shape[0]},)")

    @property
    def kind(self) -> str:
        return "images"

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])


Site = TabularSite | ImageSite
