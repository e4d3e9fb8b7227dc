"""The ``turnstore`` command line: the Typer app and the registration of every command module.

Each command module (``cli/<topic>.py``) exposes ``register(app)``; :data:`COMMAND_MODULES`
lists them in the order their commands appear in ``--help``. Shared options, output, errors and
exit codes live in :mod:`turnstore.cli.common`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Annotated

import typer

from turnstore.cli import common

# Modules holding commands; each has ``register(app: typer.Typer) -> None``.
COMMAND_MODULES = (
    "turnstore.cli.demo",
    "turnstore.cli.db",
    "turnstore.cli.sessions",
    "turnstore.cli.look",
    "turnstore.cli.move",
)


def _version() -> str:
    import turnstore

    return turnstore.__version__


app = common.new_group(
    name="turnstore",
    help=(
        "Durable, branchable, usage-tracking memory for OpenAI Agents SDK sessions in SQL. "
        "Try `turnstore demo`, then `turnstore db upgrade --url URL` for a real database."
    ),
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"turnstore {_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_show_version,
            is_eager=True,
            help="Print turnstore's version and exit. Example: turnstore --version",
        ),
    ] = False,
) -> None:
    """Durable, branchable, usage-tracking memory for OpenAI Agents SDK sessions in SQL."""


for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    command = typer.main.get_command(app)
    result: int = command.main(args=argv, prog_name="turnstore", standalone_mode=False)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
