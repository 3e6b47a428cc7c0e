"""``fedmeta bench NAME``: run one benchmark, print its table and save its rows as JSON."""

from __future__ import annotations

import argparse
import importlib
import inspect
from pathlib import Path

# name -> module in fedmeta.bench; each module defines
#   run(*, quick: bool, out_dir: Path) -> list[dict]   (rows, also printed as a table by the module)
BENCHMARKS = {
    "engine": "engine",
    "flamby": "flamby",
    "new-site": "new_site",
    "ehr": "ehr",
    "imaging": "imaging",
    "comm": "comm",
    "ceiling": "ceiling",
    "meds": "meds",
    "deploy": "deploy",
    "real": "real",
    "scale": "scale",
    "hosts": "hosts",
    "idle": "idle",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark and save its figures")
    p.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    p.add_argument("--quick", action="store_true", help="reduced setting (minutes, CI-sized)")
    p.add_argument("--json", type=Path, default=None, help="where to write the rows (JSON list)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench-results/NAME)")
    p.add_argument("--methods", default=None,
                   help="comma-separated method keys to run (new-site and imaging; default: all of them)")
    p.add_argument("--seconds", type=float, default=None,
                   help="idle: the measured window (default 600; 30 with --quick)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import json
    import sys

    module = importlib.import_module(f"fedmeta.bench.{BENCHMARKS[args.name]}")
    extra: dict[str, object] = {}
    if args.methods is not None:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        if "methods" not in inspect.signature(module.run).parameters or not methods:
            print(f"fedmeta bench {args.name}: --methods {args.methods!r}: " + (
                "this benchmark runs all its methods" if methods else "names no method"), file=sys.stderr)
            return 2
        try:
            module.check_methods(methods)
        except ValueError as e:
            print(f"fedmeta bench {args.name}: {e}", file=sys.stderr)
            return 2
        extra["methods"] = methods
    out_dir = args.out or Path("bench-results") / args.name
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.seconds is not None:
        if "seconds" not in inspect.signature(module.run).parameters:
            raise SystemExit(f"fedmeta bench {args.name}: --seconds applies only to a benchmark with a window (idle)")
        extra["seconds"] = args.seconds
    rows = module.run(quick=args.quick, out_dir=out_dir, **extra)
    json_path = args.json or out_dir / f"{args.name}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {len(rows)} rows to {json_path}")
    return 0
