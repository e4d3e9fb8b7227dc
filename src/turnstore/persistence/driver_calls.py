"""Single statements run on asyncpg itself, on connections of SQLAlchemy's pool.

The per-turn statements on Postgres (the history read and the two server functions of
:mod:`turnstore.persistence.server_routines`) are each one autocommit statement. Through
``AsyncConnection`` every one of them costs a ``Connection``, an execution context and two
greenlet switches: about 1 ms of client CPU a turn, against 0.3 ms when the same statements
go to asyncpg directly (``benchmarks/postgres_round_trips.py`` measures both). So these
statements take a pooled connection from the engine's pool, as every other operation does
(its checkout events run, it counts against the pool's size, it returns reset), and await
asyncpg's ``fetch`` on it. Errors come out as on the ordinary path: a broken connection is
invalidated, so the pool replaces it, and raises :class:`ConnectionLostError`; any other
driver error becomes SQLAlchemy's wrapper of it (``IntegrityError``...).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from turnstore.errors import connection_lost


class AsyncpgCalls:
    """Runs one statement at a time on the asyncpg connections of an engine's pool.

    Args:
        engine: An ``AsyncEngine`` on the asyncpg driver.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def fetch(self, sql: str, args: Sequence[Any], *, writes: bool) -> list[Sequence[Any]]:
        """Run ``sql`` as one autocommit statement; its rows.

        Args:
            sql: The statement, with ``$1``-style parameters.
            args: The parameters' values.
            writes: Whether the statement changes data; decides what a lost connection
                means (a write may have been applied, a read has nothing to undo).

        Raises:
            ConnectionLostError: The connection broke during the statement.
            sqlalchemy.exc.DBAPIError: The server refused the statement.
        """
        pooled = await self._engine.raw_connection()
        try:
            driver = pooled.driver_connection
            assert driver is not None
            try:
                rows: list[Sequence[Any]] = await driver.fetch(sql, *args)
            except asyncio.CancelledError:
                # asyncpg may still be waiting for the server's answer to the cancelled
                # query; never hand such a connection to the next caller.
                pooled.invalidate()
                raise
            except Exception as exc:
                raise self._translated(pooled, sql, args, exc, writes=writes) from exc
            return rows
        finally:
            await greenlet_spawn(pooled.close)

    def _translated(
        self,
        pooled: PoolProxiedConnection,
        sql: str,
        args: Sequence[Any],
        error: Exception,
        *,
        writes: bool,
    ) -> Exception:
        """The exception the ordinary execution path would raise for ``error``."""
        adapted = pooled.dbapi_connection
        dialect = self._engine.dialect
        try:
            # The adapter's own mapping from asyncpg's exceptions to its DBAPI classes.
            adapted._handle_exception(error)  # type: ignore[union-attr]
        except Exception as translated:
            error = translated
        if dialect.is_disconnect(error, adapted, None):  # type: ignore[arg-type]
            pooled.invalidate(error)
            return connection_lost(outcome_unknown=writes)
        return DBAPIError.instance(
            sql,
            tuple(args),
            error,
            dialect.loaded_dbapi.Error,
            # As the engine's own execution path would: arguments carry message content.
            hide_parameters=self._engine.sync_engine.hide_parameters,
            dialect=dialect,
        )
