"""turnstore: durable, branchable, usage-tracking memory for Agents SDK sessions, in SQL.

Use :class:`AdvancedSQLiteSession` as a drop-in for the SDK's class of the same name, or
:class:`AdvancedSession` on any supported database URL or engine; :class:`Store` lists,
inspects, erases, expires, exports, imports and copies the conversations of a database.
"""

from turnstore.errors import (
    BranchNameTakenError,
    BranchNotFoundError,
    ConnectionLostError,
    ContentNotFoundError,
    ExportFileError,
    InvalidArgumentError,
    InvalidItemError,
    ProtectedBranchError,
    ReadOnlyDatabaseError,
    SchemaMissingError,
    SessionClosedError,
    SessionExistsError,
    StorageError,
    TableSetConflictError,
    TurnNotFoundError,
    TurnstoreError,
)
from turnstore.info import SessionSummary
from turnstore.persistence.engines import dispose_engines
from turnstore.session import AdvancedSession, AdvancedSQLiteSession, SessionSettings
from turnstore.store import Removed, SessionPage, Store
from turnstore.transfer import Progress, TransferSummary

__version__ = "0.1.0"

__all__ = [
    "AdvancedSQLiteSession",
    "AdvancedSession",
    "BranchNameTakenError",
    "BranchNotFoundError",
    "ConnectionLostError",
    "ContentNotFoundError",
    "ExportFileError",
    "InvalidArgumentError",
    "InvalidItemError",
    "Progress",
    "ProtectedBranchError",
    "ReadOnlyDatabaseError",
    "Removed",
    "SchemaMissingError",
    "SessionClosedError",
    "SessionExistsError",
    "SessionPage",
    "SessionSettings",
    "SessionSummary",
    "StorageError",
    "Store",
    "TableSetConflictError",
    "TransferSummary",
    "TurnNotFoundError",
    "TurnstoreError",
    "__version__",
    "dispose_engines",
]
