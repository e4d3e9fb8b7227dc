"""Shared pieces of the migration tests: fresh Postgres databases, drift, CLI runs."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import private_namespace
from turnstore.persistence.dialects import profile_for
from turnstore.persistence.models import DEFAULT_TABLES, created_on
from turnstore.schema.migrate import VERSION_TABLE

ROOT = Path(__file__).resolve().parents[1]


def drift(connection: Connection) -> list[Any]:
    """Differences autogenerate finds between the models (dialect's key layout) and database."""
    context = MigrationContext.configure(
        connection,
        opts={
            "compare_type": True,
            "compare_server_default": True,
            "version_table": VERSION_TABLE,
            "include_object": lambda item, *_: created_on(item, connection.dialect.name),
        },
    )
    tables = DEFAULT_TABLES.with_keys(profile_for(connection.dialect.name).session_scoped_keys)
    return list(compare_metadata(context, tables.metadata))


async def engine_drift(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as conn:
        return await conn.run_sync(drift)


@asynccontextmanager
async def fresh_postgres_database(base_url: str) -> AsyncIterator[str]:
    """A new, empty database on the server of ``base_url``; dropped afterwards."""
    name = f"mig_{uuid.uuid4().hex[:12]}"
    create, drop = f"CREATE DATABASE {name}", f"DROP DATABASE {name} WITH (FORCE)"
    async with private_namespace(base_url, create, drop):
        yield make_url(base_url).set(database=name).render_as_string(hide_password=False)


def child_env() -> dict[str, str]:
    """Environment for child processes that must import this worktree's turnstore."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env.pop("TURNSTORE_DATABASE_URL", None)
    return env


def run_cli(args: Sequence[str], **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``turnstore`` in a child process, as a deployment pipeline would."""
    return subprocess.run(
        [sys.executable, "-m", "turnstore.cli", *args],
        capture_output=True,
        text=True,
        env={**child_env(), **env},
        check=False,
    )


def usage_result(input_tokens: int = 10, output_tokens: int = 5, cached_tokens: int = 0) -> Any:
    """A RunResult stand-in carrying usage (``tests.helpers.run_result`` predates the
    ``cache_write_tokens`` field that the installed ``openai`` package requires)."""
    from types import SimpleNamespace

    from agents.usage import Usage
    from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails

    usage = Usage(
        requests=1,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=input_tokens + output_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=cached_tokens, cache_write_tokens=0),
        output_tokens_details=OutputTokensDetails(reasoning_tokens=1),
    )
    return SimpleNamespace(context_wrapper=SimpleNamespace(usage=usage))
