"""Database errors as turnstore errors that name what failed without quoting content.

SQLAlchemy's error text carries the statement's parameters (the user's messages) unless the
engine hides them, and a driver's own message may quote a value too (MySQL's "Incorrect
string value: ..." with the bytes). :func:`storage_error` turns such an error into a
:class:`~turnstore.errors.StorageError` that names the operation, the session id, the error
class and the driver's code, and adds the driver's message only where the user opted in to
model data in logs (:mod:`turnstore.redaction`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import DBAPIError, StatementError

from turnstore.errors import ReadOnlyDatabaseError, StorageError
from turnstore.persistence.dialects.base import DialectProfile
from turnstore.redaction import dont_log_model_data


def storage_error(
    operation: str, session_id: str, error: StatementError, profile: DialectProfile | None
) -> StorageError:
    """The turnstore error for a database error raised while ``operation`` ran.

    Args:
        operation: The public method that failed.
        session_id: The session it ran for.
        error: SQLAlchemy's exception.
        profile: The engine's dialect profile, which reads driver codes (``None``: unknown).
    """
    original: BaseException = error
    if isinstance(error, DBAPIError) and error.orig is not None:
        original = error.orig
    error_class = type(original).__name__
    code = profile.error_code(original) if profile is not None else None
    read_only = profile is not None and profile.is_read_only_error(original)
    detail = f"{error_class}{f' [{code}]' if code else ''}"
    if read_only:
        message = (
            f"{operation} cannot write to session {session_id!r}: the database is read-only "
            f"({detail}). Reads work; open a writable database to change it."
        )
    else:
        message = f"{operation} failed for session {session_id!r} in the database: {detail}"
    if not dont_log_model_data():
        message += f": {_first_line(original)}"
    kind = ReadOnlyDatabaseError if read_only else StorageError
    return kind(
        message,
        operation=operation,
        session_id=session_id,
        error_class=error_class,
        code=code,
        original=error,
    )


@contextmanager
def translated(operation: str, session_id: str, profile: DialectProfile | None) -> Iterator[None]:
    """Raise database errors inside the block as :func:`storage_error`'s.

    Without the user's opt-in to model data, the original is not chained (a logged traceback
    would print its text); it stays reachable as ``StorageError.original``.
    """
    try:
        yield
    except StatementError as exc:
        failure = storage_error(operation, session_id, exc, profile)
        if dont_log_model_data():
            raise failure from None
        raise failure from exc


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
