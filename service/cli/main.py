"""The `pixelcam` command: `analyze` (`service.cli.analyze`), `serve`, `worker` and `trainer` (`service.cli.serve`).

The subcommands import what they run (onnxruntime, OpenCV, FastAPI, the worker) only when they run, so
`pixelcam --help` and a usage error answer at once.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
from collections.abc import Sequence

from service.cli.analyze import EXIT_USAGE, add_analyze_parser
from service.cli.serve import add_serve_parser, add_trainer_parser, add_worker_parser

__all__ = ["build_parser", "main"]


def _version() -> str:
    """The installed distribution's version (the source tree's when it is not installed)."""
    try:
        return importlib.metadata.version("pixelcam")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The `pixelcam` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="pixelcam", description="PixelCAM whole-slide inference")
    parser.add_argument("-V", "--version", action="version", version=f"pixelcam {_version()}")
    parser.add_argument(
        "--log-level", default="WARNING", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_analyze_parser(subparsers)
    add_serve_parser(subparsers)
    add_worker_parser(subparsers)
    add_trainer_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pixelcam` script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(level=str(args.log_level).upper(), format="pixelcam: %(levelname)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
