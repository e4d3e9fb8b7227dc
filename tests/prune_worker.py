"""A prune process for test_store_erasure: prunes in small batches until it is killed.

It reports through a pipe: ``("batch", sessions_so_far)`` after every batch (sent once the
batch committed), then ``("done", sessions)`` if it gets to the end.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from multiprocessing.connection import Connection
from typing import Any

from sqlalchemy.ext.asyncio import create_async_engine

from turnstore import Removed, Store


async def _prune(
    url: str, engine_options: dict[str, Any], before: datetime, batch_size: int, pipe: Connection
) -> None:
    engine = create_async_engine(url, **engine_options)
    async with Store(engine=engine) as store:

        def report(totals: Removed) -> None:
            pipe.send(("batch", totals.sessions))

        removed = await store.prune(before=before, batch_size=batch_size, progress=report)
        pipe.send(("done", removed.sessions))
    await engine.dispose()


def prune_until_killed(
    url: str, engine_options: dict[str, Any], before: datetime, batch_size: int, pipe: Connection
) -> None:
    """Process entry point."""
    asyncio.run(_prune(url, engine_options, before, batch_size, pipe))
