"""Alembic environment for turnstore's schema.

Three ways in:

* from :mod:`turnstore.schema.migrate` (and ``turnstore db ...``), which opens the connection, takes
  the schema lock and passes the connection in ``config.attributes["connection"]``;
* plain ``alembic upgrade head`` with this folder as script location, which connects here to
  ``sqlalchemy.url`` (or ``TURNSTORE_DATABASE_URL``) with an async engine, under the same lock;
* offline (``--sql``), which needs only the URL's dialect and prints the DDL.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import create_async_engine

from turnstore.persistence.dialects import profile_for
from turnstore.persistence.models import DEFAULT_TABLES, Base, created_on
from turnstore.schema import distribution
from turnstore.schema.migrate import URL_VARIABLE, VERSION_TABLE

config = context.config
target_metadata = Base.metadata

if config.config_file_name is not None and not config.attributes.get("connection"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = config.attributes.get("url") or os.environ.get(URL_VARIABLE)
    url = url or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError(f"No database URL: set {URL_VARIABLE} or sqlalchemy.url")
    return str(url)


def _options(dialect_name: str) -> dict[str, object]:
    return {
        "target_metadata": target_metadata,
        "version_table": VERSION_TABLE,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        "render_as_batch": dialect_name == "sqlite",
        "compare_type": True,
        # Keys only some dialects get (``ddl_if``), which autogenerate does not read itself.
        "include_object": lambda item, *_: created_on(item, dialect_name),
    }


def run_migrations_offline() -> None:
    """Print the DDL for the requested revisions without connecting."""
    url = make_url(_url())
    context.configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **_options(url.get_backend_name()),
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_on(connection: Connection) -> None:
    context.configure(connection=connection, **_options(connection.dialect.name))
    with context.begin_transaction():
        context.run_migrations()
        _distribute(connection)


def _distribute(connection: Connection) -> None:
    """On a Citus coordinator, distribute the store once it is at head (a no-op elsewhere).

    Not below head: older revisions' tables lack the keys that distribution needs. The
    report goes back to the caller through the config's attributes.
    """
    at = set(context.get_context().get_current_heads())
    if at != set(context.script.get_heads()):
        return
    tables = DEFAULT_TABLES.with_keys(profile_for(connection.dialect.name).session_scoped_keys)
    config.attributes["distribution"] = distribution.distribute_store(
        connection,
        tables,
        version_table=VERSION_TABLE,
        move_data=bool(config.attributes.get("move_data", False)),
    )


async def _run_async(url: str) -> None:
    parsed = make_url(url)
    profile = profile_for(parsed.get_backend_name())
    engine = create_async_engine(parsed, **profile.engine_options(parsed))
    profile.prepare_engine(engine.sync_engine)
    try:
        async with engine.begin() as conn:
            # Held to COMMIT: a second deployer waits here, then finds nothing left to do.
            await conn.run_sync(profile.lock_schema)
            await conn.run_sync(_run_on)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    """Migrate through the caller's connection, or one opened here."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
    else:
        asyncio.run(_run_async(_url()))


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
