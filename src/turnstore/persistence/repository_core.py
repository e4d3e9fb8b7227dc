"""What every part of the conversation repository shares.

The store (an engine handle and a table set), its cached statements, the info defaults a
write stores, the checks of optional tables and ids, and the units of work shared by the
read paths.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Table
from sqlalchemy.engine import Connection
from sqlalchemy.sql import Executable

from turnstore.errors import SchemaMissingError
from turnstore.persistence import server_routines
from turnstore.persistence.engines import EngineHandle
from turnstore.persistence.models import StoreTables
from turnstore.persistence.records import NO_INFO, InfoDefaults
from turnstore.persistence.statements import _statements
from turnstore.persistence.validation import check_identifier


class RepositoryCore:
    """The store, statements and info defaults every part of the conversation repository uses.

    :class:`~turnstore.persistence.repository.ConversationRepository` is assembled from parts
    (schema preparation, branch operations, reads, writes), each a subclass of this one.
    """

    def __init__(
        self, handle: EngineHandle, tables: StoreTables, info: InfoDefaults = NO_INFO
    ) -> None:
        self._handle = handle
        self._profile = handle.profile
        # Callers name the tables; the database's dialect decides their key layout.
        self._t = tables.with_keys(handle.profile.session_scoped_keys)
        self._q = _statements(self._t, handle.profile)
        self._info = info
        self._info_params = {
            "owner": info.user_id,
            "title": info.title,
            "metadata": info.metadata,
        }
        self._info_arguments = (
            info.user_id,
            info.title,
            server_routines.json_argument(info.metadata),
        )

    @property
    def has_info_table(self) -> bool:
        """Whether the database has the session info table (known once the schema is ready)."""
        return self._t.metadata not in self._handle.without_info

    @property
    def records_models(self) -> bool:
        """Whether the database has the turn-models table (migration 0007; known once ready)."""
        return self._has(self._t.turn_models)

    def require_info_table(self) -> None:
        """Refuse a store feature on a database that predates the session info table.

        Raises:
            SchemaMissingError: The table is missing.
        """
        if not self.has_info_table:
            raise SchemaMissingError(
                f"The database lacks turnstore's {self._t.info.name} table, which session "
                "owners, titles, metadata and the store's listings need. Upgrade the schema "
                "(turnstore db upgrade, or migration 0005), or open the session with "
                "create_tables=True."
            )

    def _touch_info(self, conn: Connection, session_id: str) -> None:
        """Inside a write: create the session's info if missing, move its activity forward."""
        if self.has_info_table:
            self._q.touch_info.execute(conn, {"sid": session_id, **self._info_params})
        elif self._info.given:
            self.require_info_table()

    def _bump_info(self, conn: Connection, session_id: str) -> None:
        """Inside a write: move an existing info row's activity forward (creating none)."""
        if self.has_info_table:
            self._q.bump_info.execute(conn, {"sid": session_id})

    def check_identifier(self, value: object, what: str) -> str:
        """Refuse an id no backend can store exactly (see :mod:`.validation`), before any SQL.

        Raises:
            InvalidArgumentError: ``value`` is not a valid id; ``what`` names it in the message.
        """
        return check_identifier(value, what)

    def _has(self, table: Table) -> bool:
        """Whether an optional table of this store exists (see ``StoreTables.optional``)."""
        return table.name not in self._handle.absent_tables.get(self._t.metadata, frozenset())


# Units of work shared by the read paths: run one statement, shape its result.


def all_rows(
    conn: Connection, stmt: Executable, params: Mapping[str, Any] | None = None
) -> list[Any]:
    """Every row of ``stmt``."""
    return list(conn.execute(stmt, params).all())


def one_row(conn: Connection, stmt: Executable, params: Mapping[str, Any] | None = None) -> Any:
    """The one row of ``stmt`` (it must return exactly one)."""
    return conn.execute(stmt, params).one()
