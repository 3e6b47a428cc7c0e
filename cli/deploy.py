"""``fedmeta provision|coordinator|site|run|deploy``: provisioning and launching a real deployment."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the deployment subcommands (filled in as the deploy package grows)."""
