"""``fedmeta predict``: apply a site-model bundle to new patients, locally.

``fedmeta predict --model BUNDLE --data FILE --out risks.csv`` reads a table (CSV, ``.csv.gz``
or Parquet) of new patients — or images (``.npy``, or ``.npz`` with an ``images`` array) for an
imaging bundle — applies the bundle's own preprocessing, and writes one row per patient: the id
column (when the bundle names one), the calibrated ``risk`` and the ``decision`` at the bundle's
threshold (multiclass: ``p_<class>`` per class and the most probable class). A table that
differs from what the model was fitted on ends with ``fedmeta: error: …`` naming the difference.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="score new patients with a site-model bundle (from fedmeta adapt)")
    p.add_argument("--model", type=Path, required=True, help="the site-model bundle (.fedmeta)")
    p.add_argument("--data", type=Path, required=True,
                   help="new patients: CSV / Parquet table, or .npy / .npz images")
    p.add_argument("--out", type=Path, required=True, help="where to write the risks (CSV)")
    p.set_defaults(func=_run)


def read_images(path: Path) -> np.ndarray:
    """Images from ``.npy`` or from ``.npz`` (its ``images`` array, or its only array)."""
    import zipfile

    import numpy as np  # noqa: F811 - imported here to keep `fedmeta --help` fast

    from fedmeta.common.errors import DataError

    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
            if "images" in keys:
                return z["images"]
            if len(keys) == 1:
                return z[keys[0]]
            raise DataError(f"{path}: holds arrays {keys}; name the images array 'images'")
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable numpy file: {e}") from e


def _run(args: argparse.Namespace) -> int:
    from fedmeta.common.bundle import load_site_model
    from fedmeta.common.data.ehr import read_table
    from fedmeta.common.preprocessing import ImagePreprocessing

    model = load_site_model(args.model)
    b = model.bundle
    source = str(args.data)
    if isinstance(b.preprocessing, ImagePreprocessing):
        data = read_images(args.data)
    else:
        data, _ = read_table(args.data)
    for note in model.check(data, source=source):
        print(f"note: {note}")
    out = model.predict_proba(data, source=source, log_notes=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(args.out, index=False)
    if b.binary:
        assert b.threshold is not None
        flagged = int(out["decision"].sum())
        print(f"{b.provenance.site}: scored {len(out)} patients for {b.outcome}; {flagged} flagged "
              f"(risk >= {b.threshold.value:.3f}, threshold policy {b.threshold.policy})")
    else:
        counts = out["decision"].value_counts().to_dict()
        print(f"{b.provenance.site}: classified {len(out)} images: "
              + ", ".join(f"{c} {counts.get(c, 0)}" for c in b.classes))
    print(f"wrote {args.out}")
    return 0
