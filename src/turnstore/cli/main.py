"""The ``turnstore`` command line: the argument parser and the dispatch to commands."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from turnstore.cli.db import add_db_commands, run_db


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turnstore", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="play a branching conversation with a scripted model on a local SQLite file",
    )
    demo.add_argument(
        "--db",
        type=Path,
        default=Path("turnstore-demo.db"),
        help="SQLite file to write (replaced if present; default: %(default)s)",
    )
    add_db_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = _build_parser().parse_args(argv)
    if args.command == "demo":
        from turnstore.cli.demo import run_demo

        asyncio.run(run_demo(args.db))
        return 0
    if args.command == "db":
        return run_db(args)
    return 2  # pragma: no cover - argparse rejects unknown commands first


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
