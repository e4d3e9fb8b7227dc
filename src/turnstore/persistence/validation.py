"""The rules every id and number passes before it reaches a statement, the same on every backend.

Ids (session ids, branch ids, batch keys) are identities: compared exactly, never trimmed,
folded or case-mapped. An id is refused with :class:`InvalidArgumentError` when no backend
could store it exactly: longer than :data:`~turnstore.persistence.types.IDENTIFIER_MAX_LENGTH`
characters, holding a NUL (Postgres text cannot) or an unpaired surrogate (not encodable as
UTF-8). Checking here, before any SQL, makes a refusal identical everywhere instead of a driver
error that differs by backend.

Integers are checked for type here; what a value beyond the columns' range means (everything,
or a turn that does not exist) is decided by the caller, which knows the operation.
"""

from __future__ import annotations

from turnstore.errors import InvalidArgumentError
from turnstore.persistence.types import IDENTIFIER_MAX_LENGTH, INTEGER_MAX


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored exactly as text on every backend, or ``None``."""
    if "\x00" in value:
        return f"contains a NUL character (at position {value.index(chr(0))})"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"contains an unpaired surrogate (at position {exc.start})"
    return None


def check_identifier(value: object, what: str) -> str:
    """Return ``value`` if it is a valid id; ``what`` names it in messages ("session_id").

    Raises:
        InvalidArgumentError: ``value`` is not a str, is longer than the id columns hold, or
            holds a NUL or an unpaired surrogate.
    """
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{what} must be a str; got {type(value).__name__}")
    if len(value) > IDENTIFIER_MAX_LENGTH:
        raise InvalidArgumentError(
            f"{what} must be at most {IDENTIFIER_MAX_LENGTH} characters on every backend; "
            f"got {len(value)}"
        )
    problem = text_problem(value)
    if problem is not None:
        raise InvalidArgumentError(f"{what} {problem}; ids must be storable text")
    return value


def check_int(value: object, argument: str, *, minimum: int = 0) -> int:
    """Return ``value`` if it is an int (not a bool) of at least ``minimum``.

    Raises:
        InvalidArgumentError: ``value`` is a bool, not an int, or below ``minimum``.
    """
    # bool is an int subclass; True as a number is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(
            f"{argument} must be an int; got {type(value).__name__} {value!r}"
        )
    if value < minimum:
        raise InvalidArgumentError(f"{argument} must be at least {minimum}; got {value}")
    return value


def fits_integer_column(value: int) -> bool:
    """Whether ``value`` fits the INTEGER columns of every backend."""
    return -INTEGER_MAX - 1 <= value <= INTEGER_MAX
