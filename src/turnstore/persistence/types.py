"""Column types whose storage differs by dialect, shared by the models and the migrations.

They live apart from the dialect profiles so that the table definitions need only the types,
and the profiles, which take table sets, need nothing from the models at import time. Together
with ``dialects.py`` this is the one place that knows what each database calls things.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
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

# Session and branch identifiers. MySQL cannot index or key an unbounded TEXT column; 255
# four-byte characters keep a three-column key (2 x 1020 bytes + an int) under InnoDB's 3072.
IDENTIFIER: TypeEngine[str] = Text().with_variant(
    mysql.VARCHAR(255, charset=_MYSQL_CHARSET, collation=_MYSQL_COLLATION), *_MYSQL_NAMES
)

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
