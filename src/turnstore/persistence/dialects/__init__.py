"""Everything that differs between database dialects, and nothing else.

The repository writes one set of queries; the few places where SQL dialects genuinely disagree
(column types, upsert syntax, how a writer takes its lock, connection set-up) are answered here,
by a :class:`~.base.DialectProfile` chosen from the engine's dialect name with
:func:`profile_for`. No other module branches on the dialect name.

:mod:`.base` holds what a profile answers and the shared answers; :mod:`.sqlite`,
:mod:`.postgres` and :mod:`.mysql` each backend's own.
"""

from __future__ import annotations

from turnstore.persistence.dialects.base import DialectProfile
from turnstore.persistence.dialects.mysql import MySQLProfile
from turnstore.persistence.dialects.postgres import PostgresProfile
from turnstore.persistence.dialects.sqlite import SQLiteProfile

_MYSQL_PROFILE = MySQLProfile()

_PROFILES: dict[str, DialectProfile] = {
    profile.name: profile for profile in (SQLiteProfile(), PostgresProfile(), _MYSQL_PROFILE)
}
# SQLAlchemy names the dialect "mariadb" for mariadb:// URLs and "mysql" for mysql:// ones,
# whichever server answers; both speak the same SQL here.
_PROFILES["mariadb"] = _MYSQL_PROFILE


def profile_for(dialect_name: str) -> DialectProfile:
    """Return the profile for a SQLAlchemy dialect name.

    Raises:
        NotImplementedError: The dialect is not supported (yet).
    """
    try:
        return _PROFILES[dialect_name]
    except KeyError:
        supported = ", ".join(sorted(_PROFILES))
        raise NotImplementedError(
            f"turnstore does not support the {dialect_name!r} dialect; supported: {supported}"
        ) from None
