"""The `--ray ADDRESS|auto` option the commands share (parsed without importing ray)."""

from __future__ import annotations

import argparse
import re

# auto, HOST:PORT (a cluster this host belongs to) or ray://HOST:PORT (Ray Client).
_ADDRESS = re.compile(r"^(auto|(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5})$")


def ray_address(text: str) -> str:
    """`auto`, `HOST:PORT` or `ray://HOST:PORT`."""
    if not _ADDRESS.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"expected auto, HOST:PORT or ray://HOST:PORT, got {text!r}"
        )
    return text


def add_ray_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup, what: str) -> None:
    """`--ray ADDRESS`: `what` (a phrase) runs on the Ray cluster there."""
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        type=ray_address,
        help=f"{what} on the Ray cluster at ADDRESS (HOST:PORT, ray://HOST:PORT, or auto: "
        "the one this host joined); needs pip install 'memorywall[ray]'",
    )
