"""The ``fedmeta`` command line: one subcommand group per module of this package.

Each module listed in ``COMMAND_MODULES`` defines ``register(subparsers)``, which adds its
subcommand(s) and sets ``func`` (taking the parsed ``argparse.Namespace``, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fedmeta.common.errors import FedmetaError

COMMAND_MODULES = ("simulate", "report", "track", "adapt", "predict", "export", "data", "bench", "deploy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmeta",
        description="Federated meta-learning for hospitals (Reptile, MAML, Meta-SGD, ProtoNets, Matching and Relation Networks).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"fedmeta.cli.{name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "httpcore"):  # one line per HTTP request to the SuperLink
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except FedmetaError as e:
        print(f"fedmeta: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedmeta: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
