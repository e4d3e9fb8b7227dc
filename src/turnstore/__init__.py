"""turnstore: durable, branchable, usage-tracking memory for Agents SDK sessions, in SQL.

Use :class:`AdvancedSQLiteSession` as a drop-in for the SDK's class of the same name, or
:class:`AdvancedSession` on any supported database URL or engine; :class:`Store` lists,
inspects, erases and expires the conversations of a database.
"""

from turnstore.errors import (
    BranchNameTakenError,
    BranchNotFoundError,
    ConnectionLostError,
    ContentNotFoundError,
    InvalidArgumentError,
    InvalidItemError,
    ProtectedBranchError,
    SchemaMissingError,
    SessionClosedError,
    TurnNotFoundError,
    TurnstoreError,
)
from turnstore.info import SessionSummary
from turnstore.persistence.engines import dispose_engines
from turnstore.session import AdvancedSession, AdvancedSQLiteSession, SessionSettings
from turnstore.store import Removed, SessionPage, Store

__version__ = "0.1.0"

__all__ = [
    "AdvancedSQLiteSession",
    "AdvancedSession",
    "BranchNameTakenError",
    "BranchNotFoundError",
    "ConnectionLostError",
    "ContentNotFoundError",
    "InvalidArgumentError",
    "InvalidItemError",
    "ProtectedBranchError",
    "Removed",
    "SchemaMissingError",
    "SessionClosedError",
    "SessionPage",
    "SessionSettings",
    "SessionSummary",
    "Store",
    "TurnNotFoundError",
    "TurnstoreError",
    "__version__",
    "dispose_engines",
]
