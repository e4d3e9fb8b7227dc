"""One exception hierarchy for every error turnstore raises on purpose.

Each class also derives from the builtin the SDK's ``AdvancedSQLiteSession`` raises in the same
situation (``ValueError``, ``TypeError``, ``RuntimeError``), so code written against the SDK keeps
catching what it caught before, while new code can catch :class:`TurnstoreError` or a precise
subclass.
"""

from __future__ import annotations


class TurnstoreError(Exception):
    """Base class of all errors raised deliberately by turnstore.

    Attributes:
        fix: The command that fixes the problem, when there is one (for example
            ``turnstore db adopt --url URL``); the command line prints it after the message.
    """

    fix: str | None = None

    def __init__(self, *args: object, fix: str | None = None) -> None:
        super().__init__(*args)
        if fix is not None:
            self.fix = fix


class SessionClosedError(TurnstoreError, RuntimeError):
    """The session was closed; create a new session object to keep working."""


class InvalidItemError(TurnstoreError, TypeError):
    """An item given to ``add_items`` cannot be stored: not a mapping, or not serializable."""


class InvalidArgumentError(TurnstoreError, ValueError):
    """An argument has the wrong type or value (turn numbers, branch names, table names)."""


class TurnNotFoundError(TurnstoreError, ValueError):
    """The requested user turn does not exist on the branch."""


class ContentNotFoundError(TurnstoreError, ValueError):
    """No user turn contains the searched text."""


class SessionNotFoundError(TurnstoreError, LookupError):
    """No session with that id has anything stored (command-line lookups of a session)."""


class BranchNotFoundError(TurnstoreError, ValueError):
    """The requested branch does not exist in the session."""


class BranchNameTakenError(TurnstoreError, ValueError):
    """The branch name was used before in this session; branch names are never reused."""


class ProtectedBranchError(TurnstoreError, ValueError):
    """The branch may not be deleted (``main``, or the current branch without ``force``)."""


class SessionExistsError(TurnstoreError, ValueError):
    """An import or copy met a session the target already has, and was told to fail."""


class ExportFileError(TurnstoreError, ValueError):
    """An export file is truncated, corrupt, of an unknown version or inconsistent.

    The message names the line (1-based). Nothing of the session the line belongs to was
    written; sessions before it were.

    Attributes:
        line: The line the problem was found on.
    """

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(f"line {line}: {problem}")
        self.line = line


class CopyMismatchError(TurnstoreError, RuntimeError):
    """A verified copy found sessions whose reads answer differently on the target."""


class SchemaMissingError(TurnstoreError, ValueError):
    """The database lacks turnstore's tables and the session was told not to create them."""


class ConnectionLostError(TurnstoreError, ConnectionError):
    """The connection to the database server broke while an operation was using it.

    The server rolls back a transaction whose connection is gone, so the operation left
    nothing behind and can be retried; the session stays usable and its next call opens a
    fresh connection. Only if the connection broke during the final COMMIT (or during a write
    that is one self-committing statement, as appends and usage writes are on Postgres) is
    the outcome unknown, and the message then says so. The driver's error is chained as
    ``__cause__``.
    """


def connection_lost(*, outcome_unknown: bool) -> ConnectionLostError:
    """The error for a server connection that broke; the pool has already discarded it.

    Args:
        outcome_unknown: Whether the server may have applied the operation: the connection
            broke during a COMMIT, or during a write that commits by itself.
    """
    if outcome_unknown:
        return ConnectionLostError(
            "The database connection was lost before the server confirmed the operation, "
            "which may or may not have been applied. Check the session's state before you "
            "retry."
        )
    return ConnectionLostError(
        "The database connection was lost during the operation, which was rolled back; "
        "retry it (the next call opens a fresh connection)."
    )


class TableSetConflictError(InvalidArgumentError):
    """The database already holds another table set's structure tables.

    ``message_structure``, ``turn_usage`` and the bookkeeping tables have fixed names (the SDK's
    class uses the same fixed names whatever ``sessions_table``/``messages_table`` are, and
    files stay compatible with it both ways), so one file or schema holds one
    ``sessions_table``/``messages_table`` pair. Give each pair its own file, schema or database.
    """


class StorageError(TurnstoreError, RuntimeError):
    """The database failed an operation for a reason other than the arguments given.

    The message names the operation, the session id and the database error's class (and its
    SQLSTATE or error code where the driver gives one), but not the database's own message or
    the statement's parameters, which may quote conversation content. Where the user opted in
    to model data in logs (``OPENAI_AGENTS_DONT_LOG_MODEL_DATA=0``), the message adds the
    database's message and the error is chained to the original as ``__cause__``.

    Attributes:
        operation: The session method that failed (``"add_items"``...).
        session_id: The session it ran for.
        error_class: The class name of the database's error (``"IntegrityError"``...).
        code: The SQLSTATE, server error number or SQLite error name, if known.
        original: The SQLAlchemy exception; its text may hold content and parameters.
    """

    def __init__(
        self,
        message: str,
        *,
        operation: str,
        session_id: str,
        error_class: str,
        code: str | None,
        original: BaseException,
    ) -> None:
        super().__init__(message)
        self.operation = operation
        self.session_id = session_id
        self.error_class = error_class
        self.code = code
        self.original = original


class ReadOnlyDatabaseError(StorageError):
    """A write reached a database that is read-only (SQLite ``?mode=ro`` or a read-only file,
    a Postgres standby, a MySQL server in read-only mode). Reads keep working."""  # noqa: D205, D209


class SchemaLockTimeoutError(TurnstoreError, TimeoutError):
    """Another process held the schema lock for longer than turnstore waits for it."""


class MigrationError(TurnstoreError, RuntimeError):
    """A schema migration could not run; the message says what to fix."""


class DatabaseUnavailableError(MigrationError):
    """The database server could not be reached or the database file could not be opened."""


class UnknownRevisionError(MigrationError):
    """A revision (asked for, or recorded in the database) is not among turnstore's migrations."""


class ForeignDatabaseError(MigrationError):
    """The database holds tables that are neither turnstore's nor the Agents SDK's."""


class DistributionError(MigrationError):
    """The database cannot be distributed as asked.

    No Citus extension, a worker node instead of the coordinator, or undistributed tables
    holding data where only ``turnstore db distribute`` may move it.
    """


class ConfirmationRequiredError(TurnstoreError, RuntimeError):
    """A destructive command was neither confirmed with ``--yes`` nor on a terminal."""


class MissingExtraError(TurnstoreError, ImportError):
    """A package turnstore needs for this is not installed; the message names the extra."""
