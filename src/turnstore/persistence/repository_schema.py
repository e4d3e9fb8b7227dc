"""Preparing a store's schema for the conversation repository.

What exists is read first; what is missing is created (or refused), the server's limits are
read, and the newest server functions the database has are chosen for appends and usage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from turnstore.errors import InvalidArgumentError, SchemaMissingError, TableSetConflictError
from turnstore.persistence.models import StoreTables
from turnstore.persistence.repository_core import RepositoryCore
from turnstore.persistence.server_routines import ServerRoutines

logger = logging.getLogger(__name__)


#: Server functions' versions and whether each exists in the database.
_RoutinesPresent = tuple[tuple[ServerRoutines, ...], list[bool]]


class SchemaPreparation(RepositoryCore):
    """Creates or checks a store's tables, indexes and server functions, once per engine."""

    async def ensure_info_table(self) -> None:
        """Refuse unless the info table exists, looking again if it was missing before.

        Raises:
            SchemaMissingError: The table is still missing.
        """
        await self.look_for_info_table()
        self.require_info_table()

    async def look_for_info_table(self) -> None:
        """Look again for an info table that was missing: a migration may have added it."""
        key, name = self._t.metadata, self._t.info.name
        if key in self._handle.without_info:
            present = await self._handle.read(lambda conn: inspect(conn).has_table(name))
            if present:
                self._handle.without_info.discard(key)
                await self._find_routines()

    async def prepare_schema(
        self,
        *,
        create: bool,
        migrate_default: Callable[[Connection], object] | None = None,
        default_is_current: Callable[[Connection], bool] | None = None,
        distribute: Callable[[Connection, StoreTables], object] | None = None,
    ) -> None:
        """Create missing tables and indexes, or check that they exist (once per engine).

        What exists is read first, without a write transaction, so a complete store on a
        read-only database opens for reading even with ``create``.

        Args:
            create: Create what is missing instead of refusing.
            migrate_default: Brings the default table set to the newest migration inside the
                given transaction. The caller supplies it so that queries do not depend on
                schema management; without it the default set is created like any other.
            default_is_current: A cheap read-only check that the default table set is at the
                newest migration; when it says so, nothing is locked or created. It keeps the
                first call of a short-lived process fast.
            distribute: Distributes a table set that was created without the migrations, in
                the same transaction, where the database is distributed (Citus); supplied by
                the caller like ``migrate_default``.

        Raises:
            SchemaMissingError: ``create`` is false and tables are missing.
            TableSetConflictError: The database holds another table set's structure tables.
        """
        handle, key = self._handle, self._t.metadata
        if key in handle.ready_schemas:
            return
        async with handle.schema_lock:
            if key in handle.ready_schemas:
                return
            if create:
                self._check_schema_names()
            current, routines_present = False, None
            if self._t.is_default and default_is_current is not None:
                current, routines_present = await handle.read(self._first_look, default_is_current)
            # At the newest migration, the default set is complete: nothing to inspect.
            missing = [] if current else await handle.read(self._missing_parts, default_is_current)
            if missing and create:
                await handle.write(
                    lambda conn: self._create_missing(conn, migrate_default, distribute)
                )
                missing = []
            required = [n for n in missing if n in self._t.names and n not in self._t.optional]
            if required:
                raise SchemaMissingError(
                    f"The database lacks turnstore's tables ({', '.join(required)}). "
                    "Pass create_tables=True to create them, or run the migrations first."
                )
            absent = handle.absent_tables[key] = frozenset(missing) & self._t.optional
            # A schema from before migration 0005 serves sessions; only the features that
            # need the info table refuse (require_info_table).
            if self._t.info.name in absent:
                handle.without_info.add(key)
            else:
                handle.without_info.discard(key)
            await handle.read_limits()
            own = absent & {self._t.turn_models.name, self._t.lineage.name}
            if own:
                # From before migration 0007: conversations work; the models of each turn and
                # branch lineage are not recorded.
                logger.warning(
                    "The database lacks turnstore's tables %s: the models of each turn and "
                    "branch lineage are not recorded. Run the migrations to add them: "
                    "turnstore db upgrade, or turnstore db adopt for a file the SDK's class "
                    "wrote.",
                    ", ".join(sorted(own)),
                )
            await self._find_routines(routines_present)
            handle.ready_schemas.add(key)

    def _first_look(
        self, conn: Connection, default_is_current: Callable[[Connection], bool]
    ) -> tuple[bool, _RoutinesPresent | None]:
        """Whether the default table set is at the newest migration, in one read.

        At the newest migration, nothing is missing, and the rest of the preparation (the
        server's limits, which server functions exist) is read on the same connection: a
        fresh process's first call then takes one connection checkout and transaction, not
        three.

        Returns:
            Whether the tables are current, and which server functions exist (see
            :meth:`_find_routines`; ``None`` when they are not current or there are none).
        """
        if not default_is_current(conn):
            return False, None
        self._handle.read_limits_on(conn)
        # Nothing is missing at the newest migration, so the versions asked about are those
        # _find_routines will look for, unless another session of the handle marked a table
        # absent meanwhile (it then asks again).
        versions = self._routine_versions(nothing_absent=True)
        if not versions:
            return True, None
        return True, (versions, self._routines_present(conn, versions))

    def _routine_versions(self, *, nothing_absent: bool = False) -> tuple[ServerRoutines, ...]:
        """The server functions' versions this store could use, newest first."""
        if self._handle.driver_calls is None:
            return ()
        versions = self._profile.server_routines(self._t)
        if nothing_absent:
            return versions
        if not self.has_info_table:
            # Functions that keep the info table cannot run without it.
            versions = tuple(routines for routines in versions if not routines.maintains_info)
        if not self._has(self._t.turn_models):
            # Nor can functions that record a turn's models without their table.
            versions = tuple(routines for routines in versions if not routines.records_models)
        return versions

    @staticmethod
    def _routines_present(conn: Connection, versions: Sequence[ServerRoutines]) -> list[bool]:
        """Whether each version's functions exist, in one query."""
        presence = ", ".join(f"({routines.presence_query})" for routines in versions)
        return [bool(here) for here in conn.exec_driver_sql(f"SELECT {presence}").one()]

    async def _find_routines(self, known: _RoutinesPresent | None = None) -> None:
        """Use the newest server functions the database has for appends and usage, if any.

        Args:
            known: Presence already read (by :meth:`_first_look`), used if it answers for
                the versions this store can use now.
        """
        released = self._profile.server_routines(self._t)
        versions = self._routine_versions()
        if not versions:
            return
        if known is not None and known[0] == versions:
            present = known[1]
        else:
            present = await self._handle.read(self._routines_present, versions)
        found = [routines for routines, here in zip(versions, present, strict=True) if here]
        if found:
            self._handle.routines[self._t.metadata] = found[0]
            if found[0] is not released[0]:
                logger.info(
                    "Using version %s of turnstore's server functions; upgrading the database "
                    "(turnstore db upgrade) adds version %s.",
                    found[0].version,
                    released[0].version,
                )
        else:
            newest = versions[0]
            logger.warning(
                "The database lacks turnstore's server functions (%s, %s); appends and usage "
                "writes take several round trips each. Run the migrations (turnstore db "
                "upgrade) to add them.",
                newest.append_name,
                newest.usage_name,
            )

    def _check_schema_names(self) -> None:
        """Refuse, before any DDL, index names the database cannot hold.

        The messages table's index is named after the table, so a long ``messages_table``
        gives a long index name: MySQL would fail halfway through creating the tables (its DDL
        is not transactional), and Postgres would silently cut the name short.

        Raises:
            InvalidArgumentError: An index name is too long for this database.
        """
        limit = self._handle.max_index_name_length
        too_long = [name for name in self._t.index_names if len(name) > limit]
        if too_long:
            raise InvalidArgumentError(
                f"Index names on {self._profile.name} are at most {limit} characters, and "
                f"{', '.join(too_long)} is longer. Choose a shorter sessions_table or "
                "messages_table."
            )

    def _missing_parts(
        self, conn: Connection, default_is_current: Callable[[Connection], bool] | None
    ) -> list[str]:
        """What ``create_tables`` would add: tables, indexes, a migration, server functions.

        Raises:
            TableSetConflictError: The database holds another table set's structure tables.
        """
        inspector = inspect(conn)
        present = set(inspector.get_table_names())
        self._refuse_other_table_set(inspector, present)
        missing = [name for name in self._t.names if name not in present]
        if missing:
            return missing
        if self._t.is_default and default_is_current is not None:
            return [] if default_is_current(conn) else ["the newest migration"]
        for table in self._t.metadata.sorted_tables:
            indexes = {index["name"] for index in inspector.get_indexes(table.name)}
            missing += [str(index.name) for index in table.indexes if index.name not in indexes]
        versions = self._profile.server_routines(self._t)
        if versions and not conn.exec_driver_sql(versions[0].presence_query).scalar():
            missing.append(versions[0].append_name)
        return missing

    def _refuse_other_table_set(self, inspector: Any, present: set[str]) -> None:
        """Refuse a database whose structure tables belong to other base tables.

        ``message_structure`` and ``turn_usage`` have fixed names, and their foreign keys
        record which sessions and messages tables own them (as the SDK's class records it).

        Raises:
            TableSetConflictError: They refer to another sessions or messages table.
        """
        t, same = self._t, self._profile.table_names_equal
        owners = (
            (t.structure.name, "message_id", t.messages.name),
            (t.structure.name, "session_id", t.sessions.name),
            (t.usage.name, "session_id", t.sessions.name),
        )
        for table, column, owner in owners:
            name = next((found for found in present if same(found, table)), None)
            if name is None:
                continue
            for key in inspector.get_foreign_keys(name):
                referred = str(key["referred_table"])
                if key["constrained_columns"] == [column] and not same(referred, owner):
                    raise TableSetConflictError(
                        f"This database's {table}.{column} refers to table {referred!r}, not "
                        f"to the configured {owner!r}: it already holds another "
                        "sessions_table/messages_table pair. The structure and usage tables "
                        "have fixed names (as in the SDK's AdvancedSQLiteSession), so one "
                        "database file or schema holds one pair; give this pair its own file, "
                        "schema or database."
                    )

    def _create_missing(
        self,
        conn: Connection,
        migrate_default: Callable[[Connection], object] | None,
        distribute: Callable[[Connection, StoreTables], object] | None,
    ) -> None:
        self._profile.prepare_ddl(conn)
        self._profile.lock_schema(conn)
        inspector = inspect(conn)
        self._refuse_other_table_set(inspector, set(inspector.get_table_names()))
        if self._t.is_default and migrate_default is not None:
            # The migrations own the default table set: create through them (and stamp), so a
            # database made here can be upgraded later like any other.
            migrate_default(conn)
            return
        metadata = self._t.metadata
        metadata.create_all(conn, checkfirst=True)
        self._profile.create_server_routines(conn, self._t)
        # create_all skips tables that exist (say, written by the SDK) and so their indexes;
        # add any index such a table is missing.
        inspector = inspect(conn)
        for table in metadata.sorted_tables:
            present = {index["name"] for index in inspector.get_indexes(table.name)}
            for index in table.indexes:
                if index.name not in present:
                    index.create(conn, checkfirst=True)
        if distribute is not None:
            distribute(conn, self._t)
