"""``fedmeta export``: a site-model bundle as an ONNX file (optional extra ``fedmeta[onnx]``).

``fedmeta export --model BUNDLE --onnx OUT.onnx [--check-data FILE]`` writes the bundle's
preprocessing, network, calibration and threshold as one ONNX graph (see
:mod:`fedmeta.cli.onnx_export` for what stays outside it). With ``--check-data`` the ONNX model
is run with onnxruntime on those rows and compared with the PyTorch bundle; a difference above
``--atol`` (1e-5) is an error.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a site-model bundle to ONNX (needs fedmeta[onnx])")
    p.add_argument("--model", type=Path, required=True, help="the site-model bundle (.fedmeta)")
    p.add_argument("--onnx", type=Path, required=True, help="where to write the ONNX model")
    p.add_argument("--check-data", type=Path, default=None,
                   help="a table (or images) to compare ONNX Runtime with PyTorch on")
    p.add_argument("--atol", type=float, default=1e-5, help="largest accepted difference (default 1e-5)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from fedmeta.cli.onnx_export import ExportError, compare_with_pytorch, export_onnx
    from fedmeta.cli.predict import read_images
    from fedmeta.common.bundle import SiteModelBundle
    from fedmeta.common.data.ehr import read_table
    from fedmeta.common.preprocessing import ImagePreprocessing

    bundle = SiteModelBundle.load(args.model)
    out = export_onnx(bundle, args.onnx)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    if args.check_data is not None:
        is_images = isinstance(bundle.preprocessing, ImagePreprocessing)
        data = read_images(args.check_data) if is_images else read_table(args.check_data)[0]
        diff = compare_with_pytorch(bundle, out, data, source=str(args.check_data))
        if not diff <= args.atol:
            raise ExportError(f"{out}: ONNX Runtime and PyTorch differ by {diff:.2e} on "
                              f"{args.check_data} (more than --atol {args.atol:g})")
        print(f"checked on {len(data)} rows of {args.check_data}: largest difference {diff:.2e}")
    return 0
