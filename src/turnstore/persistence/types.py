"""Column types whose storage differs by dialect, shared by the models and the migrations.

They live apart from the dialect profiles so that the table definitions need only the types,
and the profiles, which take table sets, need nothing from the models at import time. Together
with the ``dialects`` package this is the one place that knows what each database calls things.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import TIMESTAMP, BigInteger, Integer, Text
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.type_api import TypeEngine
from sqlalchemy.types import TypeDecorator

from turnstore.persistence import jsoncodec

_MYSQL_NAMES = ("mysql", "mariadb")

# Primary keys and references to them. SQLite needs the exact type name INTEGER for a rowid
# alias (and AUTOINCREMENT); servers get 64 bits because message tables grow without bound.
ROW_ID: TypeEngine[int] = BigInteger().with_variant(Integer(), "sqlite")

# MySQL text compares case- and accent-insensitively under its default collations, so "Main"
# would collide with "main" in a unique key; a binary utf8mb4 collation keeps the exact,
# code-point equality SQLite and Postgres give, and 4-byte UTF-8 stores any character (emoji).
_MYSQL_CHARSET = "utf8mb4"
_MYSQL_COLLATION = "utf8mb4_bin"

#: Most characters (code points) a session id, branch id or other identifier may have, on
#: every backend. MySQL cannot index or key an unbounded TEXT column; 255 four-byte
#: characters keep a three-column key (2 x 1020 bytes + an int) under InnoDB's 3072, and
#: Postgres's B-tree entries (at most about 2,700 bytes) hold them too.
IDENTIFIER_MAX_LENGTH = 255

#: The largest value turnstore's INTEGER columns (turn and sequence numbers, counters) hold
#: on every backend; Postgres and MySQL INTEGER are 32-bit.
INTEGER_MAX = 2**31 - 1

# Identifiers compare byte for byte. utf8mb4_bin is binary but PAD SPACE: "user-42 " equals
# "user-42" in a comparison and a unique key, so one tenant's id would reach another's rows.
# These binary collations are NO PAD (MariaDB 10.2+, MySQL 8.0.17+).
_MARIADB_EXACT_COLLATION = "utf8mb4_nopad_bin"
_MYSQL_EXACT_COLLATION = "utf8mb4_0900_bin"
# What identifiers were created with before migration 0006.
PADDED_IDENTIFIER_COLLATION = _MYSQL_COLLATION


def exact_identifier_collation(dialect: Dialect) -> str:
    """The binary NO PAD collation of identifier columns on a MySQL or MariaDB server.

    Decided by the server the dialect has connected to: SQLAlchemy names the dialect "mysql"
    for MariaDB servers reached through mysql:// URLs. Servers older than the NO PAD binary
    collations (MySQL before 8.0.17) keep ``utf8mb4_bin``, where trailing spaces are ignored
    in comparisons.
    """
    if getattr(dialect, "is_mariadb", False):
        return _MARIADB_EXACT_COLLATION
    version = dialect.server_version_info or ()
    if tuple(version[:3]) >= (8, 0, 17):
        return _MYSQL_EXACT_COLLATION
    return _MYSQL_COLLATION


def identifier_column_type(dialect: Dialect, collation: str | None = None) -> TypeEngine[str]:
    """The storage type of an identifier column on ``dialect`` (``collation``: MySQL's, if set).

    Args:
        dialect: The connected dialect.
        collation: On MySQL, this collation instead of :func:`exact_identifier_collation`.
    """
    if dialect.name in _MYSQL_NAMES:
        return mysql.VARCHAR(
            IDENTIFIER_MAX_LENGTH,
            charset=_MYSQL_CHARSET,
            collation=collation or exact_identifier_collation(dialect),
        )
    return Text()


class ExactIdentifier(TypeDecorator[str]):
    """A session, branch or other id: text compared exactly, byte for byte, on every backend.

    SQLite and Postgres text compares exactly already; MySQL gets a ``VARCHAR`` with a binary
    NO PAD collation chosen for the connected server (see :func:`exact_identifier_collation`).
    """

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        """Pick the storage type for the dialect (and, on MySQL, for the server)."""
        # Not through type_descriptor: some drivers map Text to a runtime VARCHAR type, which
        # would then be what DDL and Alembic's type comparison see.
        return identifier_column_type(dialect)


# Session and branch identifiers (and every other id column of a table of ours).
IDENTIFIER: TypeEngine[str] = ExactIdentifier()

# A serialized conversation item. MySQL's TEXT stops at 64 KiB; items can be megabytes.
DOCUMENT: TypeEngine[str] = Text().with_variant(
    mysql.LONGTEXT(charset=_MYSQL_CHARSET, collation=_MYSQL_COLLATION), *_MYSQL_NAMES
)

# Server-stamped creation times. Postgres stores an absolute instant so the server's TimeZone
# setting cannot shift what CURRENT_TIMESTAMP means; SQLite's CURRENT_TIMESTAMP is UTC already.
# MySQL's TIMESTAMP ends in 2038, so it gets DATETIME; MySQLProfile pins every connection's
# time_zone to UTC, which makes CURRENT_TIMESTAMP (and so the stored wall time) UTC.
TIMESTAMP_UTC: TypeEngine[Any] = (
    TIMESTAMP()
    .with_variant(postgresql.TIMESTAMP(timezone=True), "postgresql")
    .with_variant(mysql.DATETIME(), *_MYSQL_NAMES)
)

# Keyword arguments for every ``Table``: table-level defaults that only MySQL reads (other
# dialects ignore ``mysql_*`` options). They cover the plain Text columns too, whatever the
# database's own default character set is.
TABLE_OPTIONS: Mapping[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": _MYSQL_CHARSET,
    "mysql_collate": _MYSQL_COLLATION,
}


class _JSONDeclaredText(Text):
    """Text that SQLite declares as ``JSON``, the column type the SDK's schema uses."""


@compiles(_JSONDeclaredText, "sqlite")
def _compile_json_declared_text(type_: _JSONDeclaredText, compiler: Any, **kw: Any) -> str:
    return "JSON"


class JSONDocument(TypeDecorator[Any]):
    """A small JSON document: native JSONB/JSON on servers, JSON text on SQLite.

    Reading is lenient on SQLite, where the column holds free text written by any client: a
    value that is not valid JSON reads back as ``None`` (as the SDK's class does) instead of
    failing the whole query.
    """

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        """Pick the storage type for the dialect."""
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.JSONB(none_as_null=True))
        if dialect.name in _MYSQL_NAMES:
            return dialect.type_descriptor(mysql.JSON(none_as_null=True))
        return dialect.type_descriptor(_JSONDeclaredText())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        """Serialize on text storage; native JSON types serialize for themselves."""
        if value is None or dialect.name == "postgresql" or dialect.name in _MYSQL_NAMES:
            return value
        return json.dumps(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        """Parse text storage, reading invalid JSON as ``None``."""
        return jsoncodec.loads_or_none(value, "token-details")


# Dialects whose autoincrement column must lead an index of its own: InnoDB refuses an
# AUTO_INCREMENT column that is only the second column of a composite primary key.
ROW_ID_NEEDS_OWN_INDEX: tuple[str, ...] = _MYSQL_NAMES


# -- values moving between databases ---------------------------------------------------------
#
# An export carries timestamps as text ("YYYY-MM-DD HH:MM:SS", with ".ffffff" where the source
# kept sub-second digits; always UTC) and token details as the JSON text the source stored.
# Each database wants them in its own form; these types turn the carried form into it.


def parse_timestamp(value: str) -> datetime:
    """An exported timestamp as a naive UTC datetime.

    Raises:
        ValueError: ``value`` is not an ISO 8601 date and time.
    """
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed


def _stored_timestamp(value: str | datetime, dialect_name: str) -> Any:
    if dialect_name == "sqlite":
        # SQLite keeps the text CURRENT_TIMESTAMP writes, to the second (what the SDK writes
        # and what every read reports); text that is no timestamp stays as it was.
        if isinstance(value, datetime):
            return value.strftime("%Y-%m-%d %H:%M:%S")
        try:
            return parse_timestamp(value).strftime("%Y-%m-%d %H:%M:%S")
        except ValueError:
            return value
    moment = parse_timestamp(value) if isinstance(value, str) else value
    if dialect_name == "postgresql":
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
    # MySQL's DATETIME keeps whole seconds; MySQL would round the rest, MariaDB cut it. Cut
    # it here, as every read reports timestamps.
    return moment.replace(microsecond=0, tzinfo=None)


class ExchangedTimestamp(TypeDecorator[Any]):
    """Binds an exported timestamp (text or datetime) into a :data:`TIMESTAMP_UTC` column."""

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        """The column's own storage type; on SQLite, the text as it is."""
        if dialect.name == "sqlite":
            return dialect.type_descriptor(Text())
        return dialect.type_descriptor(TIMESTAMP_UTC)

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        """Convert to the database's form (see :func:`stored_timestamp`)."""
        return None if value is None else _stored_timestamp(value, dialect.name)


def stored_timestamp(value: str | datetime | None, dialect: Dialect) -> Any:
    """An exported timestamp as ``dialect`` stores it in a :data:`TIMESTAMP_UTC` column.

    SQLite gets the text ``CURRENT_TIMESTAMP`` writes (whole seconds); Postgres an aware UTC
    datetime; MySQL and MariaDB a naive UTC datetime cut to the second.

    Raises:
        ValueError: Text that is no ISO 8601 timestamp, for a server.
    """
    return None if value is None else _stored_timestamp(value, dialect.name)


class ExchangedJSON(TypeDecorator[Any]):
    """Binds JSON text into a :class:`JSONDocument` column.

    As it is on SQLite, where the column holds text; parsed on servers, whose native JSON
    types encode it themselves.

    Text that is not JSON is stored as SQL NULL on servers; SQLite readers (turnstore's and
    the SDK's) read it as ``None`` too, so every read answers the same.
    """

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        """The column's own storage type."""
        return JSONDocument().load_dialect_impl(dialect)

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        """Keep the text on SQLite; decode it for a server's JSON type."""
        if value is None or dialect.name == "sqlite":
            return value
        return jsoncodec.loads_or_none(value, "token-details")
