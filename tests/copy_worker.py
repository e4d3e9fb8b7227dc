"""A copying process for test_moving's kill test: copies a store until it is killed.

It reports ``("ready",)`` once both databases are open, then ``("copied", session_id)`` after
each session's transaction has committed.
"""

from __future__ import annotations

import asyncio
from multiprocessing.connection import Connection
from typing import Any

from sqlalchemy.ext.asyncio import create_async_engine

from turnstore import transfer
from turnstore.persistence import engines
from turnstore.persistence.models import DEFAULT_TABLES


async def _copy(
    source_url: str, target_url: str, target_options: dict[str, Any], progress: Connection
) -> None:
    target_engine = create_async_engine(target_url, **target_options)
    source = engines.acquire_for_url(source_url)
    target = engines.acquire_for_engine(target_engine)
    progress.send(("ready",))
    await transfer.copy_sessions(
        (source, DEFAULT_TABLES),
        (target, DEFAULT_TABLES),
        batch_size=7,
        progress=lambda p: progress.send(("copied", p.session_id)),
    )
    progress.send(("done",))


def copy_until_killed(
    source_url: str, target_url: str, target_options: dict[str, Any], progress: Connection
) -> None:
    """Process entry point: copy every session of the source into the target."""
    asyncio.run(_copy(source_url, target_url, target_options, progress))
