"""Run turnstore's schema migrations from code: upgrade, downgrade, stamp, inspect, adopt.

Every function that changes the schema opens one transaction, takes the dialect's schema lock
(:meth:`turnstore.persistence.dialects.base.DialectProfile.lock_schema`) and only then lets
Alembic read the version table, so processes that upgrade at the same time run one after the
other: the first migrates, the rest find the database at head and do nothing. That makes
:func:`upgrade` safe to await at application start-up.

The Alembic scripts ship inside the package (``turnstore/migrations``) and are found there
first, then in a source checkout's top-level ``migrations/`` folder.
"""

from __future__ import annotations

import inspect
import io
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from turnstore.errors import (
    DatabaseUnavailableError,
    ForeignDatabaseError,
    InvalidArgumentError,
    MigrationError,
    MissingExtraError,
    UnknownRevisionError,
)
from turnstore.persistence.dialects import profile_for
from turnstore.persistence.dialects.base import DialectProfile
from turnstore.schema import adoption, distribution
from turnstore.schema.check import VERSION_TABLE, script_location

__all__ = [
    "URL_VARIABLE",
    "VERSION_TABLE",
    "MigrationInfo",
    "Move",
    "adopt",
    "alembic_config",
    "bring_to_head",
    "current",
    "data_dropping_steps",
    "distribute",
    "downgrade",
    "head",
    "history",
    "script_location",
    "stamp",
    "upgrade",
    "upgrade_sql",
]

URL_VARIABLE = "TURNSTORE_DATABASE_URL"
# The revision that gives server tables session-scoped keys (see persistence.models).
SERVER_KEYS_REVISION = "0008"

Target = str | URL | AsyncEngine
_T = TypeVar("_T")


@dataclass(frozen=True)
class Move:
    """What :func:`upgrade` or :func:`downgrade` did.

    Attributes:
        before: The revisions recorded before (empty: none).
        after: The revisions recorded after.
    """

    before: tuple[str, ...]
    after: tuple[str, ...]

    @property
    def changed(self) -> bool:
        """Whether any migration ran."""
        return self.before != self.after


@dataclass(frozen=True)
class MigrationInfo:
    """One migration script.

    Attributes:
        revision: Its revision id.
        down_revision: The revision it upgrades from (``None`` for the first).
        description: Its one-line summary.
        is_head: Whether it is the newest revision.
    """

    revision: str
    down_revision: str | None
    description: str
    is_head: bool


# -- scripts -------------------------------------------------------------------------------


def alembic_config(
    *,
    url: str | None = None,
    connection: Connection | None = None,
    output: io.StringIO | None = None,
) -> Config:
    """An Alembic ``Config`` for turnstore's scripts, built without an ini file.

    Args:
        url: Database URL for offline (``--sql``) runs.
        connection: An open connection, in a transaction, that migrations run on.
        output: Where offline SQL and command output go (standard output if ``None``).
    """
    config = Config(output_buffer=output, stdout=output or sys.stdout)
    # ConfigParser interpolates '%'; paths may contain it.
    config.set_main_option("script_location", str(script_location()).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    config.attributes["url"] = url
    config.attributes["connection"] = connection
    return config


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    """The newest revision id.

    Raises:
        MigrationError: The scripts have more than one head (a packaging mistake).
    """
    heads = _scripts().get_heads()
    if len(heads) != 1:
        raise MigrationError(f"turnstore's migrations have {len(heads)} heads: {heads}")
    return heads[0]


def history() -> list[MigrationInfo]:
    """Every migration script, oldest first."""
    scripts = _scripts()
    heads = set(scripts.get_heads())
    infos = [
        MigrationInfo(
            revision=script.revision,
            down_revision=_single(script.down_revision),
            description=(script.doc or "").strip(),
            is_head=script.revision in heads,
        )
        for script in scripts.walk_revisions()
    ]
    return infos[::-1]


def _single(value: str | Sequence[str] | None) -> str | None:
    if value is not None and not isinstance(value, str):
        return ", ".join(value)
    return value


def _check_revision_exists(revision: str) -> None:
    if revision in ("head", "heads", "base") or ":" in revision:
        return
    try:
        found = _scripts().get_revisions(revision)
    except CommandError as exc:
        raise UnknownRevisionError(_revision_hint(revision, exc)) from exc
    if not found:
        raise UnknownRevisionError(_revision_hint(revision, None))


def _revision_hint(revision: str, exc: Exception | None) -> str:
    known = ", ".join(info.revision for info in history())
    detail = f" ({_one_line(exc)})" if exc is not None else ""
    return f"Unknown revision {revision!r}{detail}; known revisions: base, {known}"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# -- database access -----------------------------------------------------------------------


def _parse(target: str | URL) -> URL:
    try:
        return make_url(target)
    except ArgumentError as exc:
        raise InvalidArgumentError(
            f"Not a database URL: {target!r}; expected e.g. sqlite+aiosqlite:///file.db or "
            "postgresql+asyncpg://user@host/db"
        ) from exc


def _profile(url: URL) -> DialectProfile:
    try:
        return profile_for(url.get_backend_name())
    except NotImplementedError as exc:
        raise InvalidArgumentError(str(exc)) from exc


@asynccontextmanager
async def _engine(target: Target) -> AsyncIterator[tuple[AsyncEngine, DialectProfile]]:
    if isinstance(target, AsyncEngine):
        profile = profile_for(target.dialect.name)
        profile.prepare_engine(target.sync_engine)
        yield target, profile
        return
    url = _parse(target)
    profile = _profile(url)
    try:
        engine = create_async_engine(url, hide_parameters=True, **profile.engine_options(url))
    except ImportError as exc:
        raise MissingExtraError(
            f"Cannot use {url.render_as_string(hide_password=True)!r}: {profile.driver_hint(url)}"
        ) from exc
    except (InvalidRequestError, ArgumentError) as exc:
        raise InvalidArgumentError(
            f"Cannot use {url.render_as_string(hide_password=True)!r}: {profile.driver_hint(url)}"
        ) from exc
    profile.prepare_engine(engine.sync_engine)
    try:
        yield engine, profile
    finally:
        await engine.dispose()


@asynccontextmanager
async def _connection(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    where = engine.url.render_as_string(hide_password=True)
    reason = profile_for(engine.dialect.name).unreachable_reason(engine.url)
    if reason is not None:
        raise DatabaseUnavailableError(f"Cannot open {where}: {reason}")
    try:
        conn = await engine.connect()
    except (OSError, DBAPIError, TimeoutError) as exc:
        raise DatabaseUnavailableError(
            f"Cannot connect to {where}: {_one_line(exc)}; check the URL and that the database "
            "is running and reachable"
        ) from exc
    try:
        yield conn
    finally:
        await conn.close()


async def _run(target: Target, work: Callable[[Connection], _T], *, lock: bool = True) -> _T:
    """Run ``work`` on a connection in one transaction, under the schema lock if ``lock``."""
    async with _engine(target) as (engine, profile), _connection(engine) as conn, conn.begin():
        if lock:
            await conn.run_sync(profile.lock_schema)
        return await conn.run_sync(work)


def _recorded(connection: Connection) -> tuple[str, ...]:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return tuple(context.get_current_heads())


def _check_recorded_known(connection: Connection) -> tuple[str, ...]:
    recorded = _recorded(connection)
    scripts = _scripts()
    for revision in recorded:
        try:
            scripts.get_revision(revision)
        except CommandError as exc:
            raise UnknownRevisionError(
                f"The database is at revision {revision!r}, which this turnstore version does "
                "not know; install the turnstore version that migrated it"
            ) from exc
    return recorded


def _alembic(
    action: Callable[[Config], None], connection: Connection, *, move_data: bool = False
) -> distribution.DistributionReport | None:
    """Run an Alembic command on ``connection``; on a Citus coordinator, what it distributed.

    Args:
        action: The command, given the config.
        connection: A connection in the caller's (schema-locked) transaction.
        move_data: Let the distribution that follows a migration to head move tables that
            hold rows into shards (see :func:`turnstore.schema.distribution.distribute_store`).
    """
    config = alembic_config(connection=connection)
    config.attributes["move_data"] = move_data
    try:
        action(config)
    except CommandError as exc:
        raise MigrationError(_one_line(exc)) from exc
    report = config.attributes.get("distribution")
    return report if isinstance(report, distribution.DistributionReport) else None


# -- public API ----------------------------------------------------------------------------


async def upgrade(target: Target, revision: str = "head", *, require_citus: bool = False) -> Move:
    """Upgrade the database to ``revision`` (serialized against concurrent upgrades).

    Tables of other applications in the same database are left alone. A database holding the
    Agents SDK's tables without turnstore's version record is refused: :func:`adopt` it first.

    On a Citus coordinator (a database with the ``citus`` extension), an upgrade to head
    also distributes every turnstore table by ``session_id``, makes the version table a
    reference table and distributes the server functions (see
    :mod:`turnstore.schema.distribution`). Undistributed tables holding rows are refused
    there: moving data is :func:`distribute`'s job.

    Args:
        target: Database URL or an ``AsyncEngine`` you own (left open).
        revision: Target revision; ``head`` for the newest.
        require_citus: Refuse unless the database is a Citus coordinator (so a deployment
            meant for a cluster never creates single-server tables by mistake).

    Returns:
        The revisions before and after.

    Raises:
        InvalidArgumentError: The URL is malformed or names an unsupported driver.
        DatabaseUnavailableError: The database cannot be reached.
        UnknownRevisionError: ``revision``, or the database's recorded revision, is unknown.
        DistributionError: ``require_citus`` on a database without Citus; a Citus worker;
            undistributed tables with rows on a coordinator.
        ForeignDatabaseError: The database holds SDK tables not yet adopted, or store tables
            turnstore cannot use; nothing was changed.
        MigrationError: A migration failed.
    """
    return await _move(target, revision, command.upgrade, "upgrade", require_citus=require_citus)


async def distribute(target: Target) -> distribution.DistributionReport:
    """Turn a database on a Citus coordinator into a distributed store, in place.

    Brings the schema to head first, then distributes every turnstore table by
    ``session_id`` (co-located), copying the rows the tables hold into shards and removing
    them from the coordinator, all in one transaction. Idempotent: a distributed store is
    left as it is.

    Returns:
        What was distributed now (nothing, when it already was).

    Raises:
        InvalidArgumentError: The URL is malformed or names an unsupported driver.
        DatabaseUnavailableError: The database cannot be reached.
        UnknownRevisionError: The database's recorded revision is unknown.
        DistributionError: The database has no Citus extension, or this is a worker node.
        ForeignDatabaseError: A store table lacks columns turnstore needs.
        MigrationError: A migration failed.
    """

    def work(connection: Connection) -> distribution.DistributionReport:
        node = distribution.require_coordinator(connection)
        report = bring_to_head(connection, move_data=True)
        return report if report is not None else distribution.DistributionReport(node=node)

    return await _run(target, work)


async def downgrade(target: Target, revision: str) -> Move:
    """Downgrade the database to ``revision`` (``base`` drops every turnstore table).

    Returns:
        The revisions before and after.

    Raises:
        InvalidArgumentError: The URL is malformed or names an unsupported driver.
        DatabaseUnavailableError: The database cannot be reached.
        UnknownRevisionError: ``revision``, or the database's recorded revision, is unknown.
        MigrationError: A migration failed.
    """
    return await _move(target, revision, command.downgrade, "downgrade")


async def _move(
    target: Target,
    revision: str,
    move: Callable[[Config, str], None],
    verb: str,
    *,
    require_citus: bool = False,
) -> Move:
    """Run Alembic's upgrade or downgrade to ``revision`` after checking both revisions."""
    _check_revision_exists(revision)

    def work(connection: Connection) -> Move:
        if require_citus:
            distribution.require_coordinator(connection)
        before = _check_recorded_known(connection)
        if verb == "upgrade" and not before:
            _refuse_unversioned_store(connection)
        try:
            _alembic(lambda config: move(config, revision), connection)
        except DBAPIError as exc:
            at = ", ".join(before) or "base"
            raise MigrationError(
                f"{verb.capitalize()} to {revision} failed: {_one_line(exc.orig or exc)} "
                f"(the database was at {at}; it is left as the failed step left it)"
            ) from exc
        return Move(before=before, after=_recorded(connection))

    return await _run(target, work)


def _refuse_unversioned_store(connection: Connection) -> None:
    """Stop an upgrade of a database whose store tables were not made by migrations."""
    found = adoption.inspect_database(connection, VERSION_TABLE)
    if found.incompatible:
        raise ForeignDatabaseError(f"Cannot upgrade this database: {found.reason}")
    if found.store_tables:
        raise ForeignDatabaseError(
            "The database holds Agents SDK session tables "
            f"({', '.join(found.store_tables)}) but no turnstore version record, so "
            "migrations cannot run on it; adopt it first (it only adds, see README, Migrations)",
            fix=f"turnstore db adopt --url {_where(connection)}",
        )


def _where(connection: Connection) -> str:
    return connection.engine.url.render_as_string(hide_password=True)


def data_dropping_steps(recorded: Sequence[str], revision: str) -> list[MigrationInfo]:
    """The migrations a downgrade from ``recorded`` to ``revision`` undoes that drop data.

    A step drops data when its ``downgrade()`` drops a table or a column (read from the
    script's source, so new migrations are covered without bookkeeping).

    Args:
        recorded: The database's revisions (:func:`current`).
        revision: The downgrade's target.

    Raises:
        UnknownRevisionError: ``revision`` is unknown.
    """
    _check_revision_exists(revision)
    if not recorded:
        return []
    scripts = _scripts()
    lower = None if revision == "base" else revision
    steps: list[MigrationInfo] = []
    for upper in recorded:
        try:
            walked = list(scripts.iterate_revisions(upper, lower or "base"))
        except CommandError:
            # ``revision`` is not below ``upper`` (a no-op or an upgrade): nothing is undone.
            continue
        for script in walked:
            if script.revision == lower:
                continue
            body = inspect.getsource(script.module.downgrade)
            if any(word in body for word in ("drop_table", "drop_column", "DROP TABLE")):
                steps.append(
                    MigrationInfo(
                        revision=script.revision,
                        down_revision=_single(script.down_revision),
                        description=(script.doc or "").strip(),
                        is_head=False,
                    )
                )
    return steps


async def stamp(target: Target, revision: str = "head") -> None:
    """Record ``revision`` as the database's revision without running any migration.

    Raises:
        InvalidArgumentError: The URL is malformed or names an unsupported driver.
        DatabaseUnavailableError: The database cannot be reached.
        UnknownRevisionError: ``revision`` is unknown.
    """
    _check_revision_exists(revision)

    def work(connection: Connection) -> None:
        _alembic(lambda config: command.stamp(config, revision, purge=True), connection)

    await _run(target, work)


async def inspect_target(target: Target) -> tuple[adoption.Inspection, tuple[str, ...]]:
    """What the database holds, and the revisions it records, without changing anything.

    Raises:
        InvalidArgumentError: The URL is malformed or names an unsupported driver.
        DatabaseUnavailableError: The database cannot be reached.
        UnknownRevisionError: The recorded revision is not one of turnstore's.
    """

    def work(connection: Connection) -> tuple[adoption.Inspection, tuple[str, ...]]:
        return adoption.inspect_database(connection, VERSION_TABLE), _check_recorded_known(
            connection
        )

    return await _run(target, work, lock=False)


async def current(target: Target) -> tuple[str, ...]:
    """The revisions recorded in the database (empty if it was never migrated).

    Raises:
        InvalidArgumentError: The URL is malformed or names an unsupported driver.
        DatabaseUnavailableError: The database cannot be reached.
        UnknownRevisionError: The recorded revision is not one of turnstore's.
    """
    return await _run(target, _check_recorded_known, lock=False)


def upgrade_sql(url: str | URL, revision: str = "head", *, from_revision: str | None = None) -> str:
    """The DDL that upgrades a database at ``from_revision`` (default: empty) to ``revision``.

    Nothing connects: only the URL's dialect matters. Hand the output to a DBA or apply it
    with ``psql`` / ``sqlite3``.

    Raises:
        InvalidArgumentError: The URL is malformed or names an unsupported dialect.
        UnknownRevisionError: A revision is unknown.
    """
    parsed = _parse(url)
    _profile(parsed)
    _check_revision_exists(revision)
    if from_revision is not None:
        _check_revision_exists(from_revision)
    span = f"{from_revision}:{revision}" if from_revision else revision
    output = io.StringIO()
    config = alembic_config(url=parsed.render_as_string(hide_password=False), output=output)
    try:
        command.upgrade(config, span, sql=True)
    except CommandError as exc:
        raise MigrationError(_one_line(exc)) from exc
    return output.getvalue()


async def adopt(target: Target) -> adoption.Inspection:
    """Bring an empty, turnstore or Agents-SDK database to the current schema, in place.

    An SDK database gets its missing tables and indexes and a backfilled
    ``branch_reservations`` table, then is stamped at head; no row is changed or removed.
    Tables of other applications are left alone, as :func:`upgrade` leaves them.

    Returns:
        What the database looked like before.

    Raises:
        ForeignDatabaseError: The database holds store tables whose columns differ from the
            SDK's, or items without structure rows (a plain ``SQLiteSession`` file); it is
            left untouched.
        DatabaseUnavailableError: The database cannot be reached.
        UnknownRevisionError: The database is at a revision turnstore does not know.
    """

    def work(connection: Connection) -> adoption.Inspection:
        found = adoption.inspect_database(connection, VERSION_TABLE)
        if found.incompatible:
            raise ForeignDatabaseError(
                f"Refusing to adopt: {found.reason}. Point --url at an empty database, a "
                "turnstore database, or one written by the Agents SDK's AdvancedSQLiteSession"
            )
        bring_to_head(connection)
        return found

    return await _run(target, work)


def bring_to_head(
    connection: Connection, *, move_data: bool = False
) -> distribution.DistributionReport | None:
    """Bring the default table set to head on ``connection`` (caller holds the schema lock).

    Versioned databases are upgraded; databases with some store tables but no version (written
    by the SDK, or by turnstore before migrations) are completed in place and stamped; others
    get the migrations from scratch. Unrelated tables are ignored. On a Citus coordinator
    the store is then distributed.

    Args:
        connection: A connection in the caller's transaction.
        move_data: On a Citus coordinator, let tables that hold rows be distributed.

    Returns:
        On a Citus coordinator, what was distributed; ``None`` elsewhere.

    Raises:
        UnknownRevisionError: The database is at a revision turnstore does not know.
        ForeignDatabaseError: A store table lacks columns turnstore needs.
    """
    found = adoption.inspect_database(connection, VERSION_TABLE)
    if found.kind is adoption.DatabaseKind.TURNSTORE:
        _check_recorded_known(connection)
    elif found.incompatible:
        raise ForeignDatabaseError(f"Cannot use this database: {found.reason}")
    elif found.store_tables:
        adoption.complete_schema(connection)
        if profile_for(connection.dialect.name).session_scoped_keys:
            # The tables have the SDK's keys: record the revision before the server keys,
            # and let the migrations re-key them.
            before = _scripts().get_revision(SERVER_KEYS_REVISION).down_revision
            _alembic(lambda config: command.stamp(config, str(before)), connection)
        else:
            return _alembic(lambda config: command.stamp(config, "head"), connection)
    return _alembic(lambda config: command.upgrade(config, "head"), connection, move_data=move_data)
