"""Work that may hold a thread for seconds runs on threads of its own (Settings.bulk_threads):
validating and storing an upload, drawing a report image, building an adapter zip. The JSON routes
run on a few request threads (Settings.request_threads); however many slow requests arrive, those
stay free for them."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TypeVar

import anyio.to_thread
from anyio.lowlevel import RunVar

from store.settings import Settings

T = TypeVar("T")
_BULK_THREADS: RunVar[anyio.CapacityLimiter] = RunVar("driftsafe_bulk_threads")


def _limiter(size: int) -> anyio.CapacityLimiter:
    """One per event loop, as anyio keeps its default one."""
    try:
        return _BULK_THREADS.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(size)
        _BULK_THREADS.set(limiter)
        return limiter


async def on_bulk_threads(settings: Settings, fn: Callable[..., T], *args) -> T:
    return await anyio.to_thread.run_sync(partial(fn, *args),
                                          limiter=_limiter(settings.bulk_threads))
