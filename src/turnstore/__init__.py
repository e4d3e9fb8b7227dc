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
    SessionNotFoundError,
    StorageError,
    TableSetConflictError,
    TurnNotFoundError,
    TurnstoreError,
)
from turnstore.info import SessionSummary
from turnstore.lineage import BranchNode
from turnstore.persistence.engines import dispose_engines
from turnstore.search import SearchHit, SearchPage
from turnstore.session import AdvancedSession, AdvancedSQLiteSession
from turnstore.session_settings import SessionSettings
from turnstore.store import Removed, SessionPage, Store
from turnstore.transfer import Progress, TransferSummary
from turnstore.usage_report import UsageRow

__version__ = "0.1.0"

__all__ = [
    "AdvancedSQLiteSession",
    "AdvancedSession",
    "BranchNameTakenError",
    "BranchNode",
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
    "SearchHit",
    "SearchPage",
    "SessionClosedError",
    "SessionExistsError",
    "SessionNotFoundError",
    "SessionPage",
    "SessionSettings",
    "SessionSummary",
    "StorageError",
    "Store",
    "TableSetConflictError",
    "TransferSummary",
    "TurnNotFoundError",
    "TurnstoreError",
    "UsageRow",
    "__version__",
    "dispose_engines",
]
