"""Blocking client calls off the event loop, each on a daemon thread of its own.

Not the loop's default executor: a queue's long poll holds its thread for up to 20 s,
and a few watches doing so would starve the planners and hashing that share that pool.
Not a ThreadPoolExecutor either: its threads are joined at interpreter exit, so a stop
would wait out the poll. A cancelled call leaves its thread to finish alone; what it
received is dropped and comes back after the queue's visibility timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def off_loop(fn: Callable[[], T], name: str) -> T:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: object) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)  # type: ignore[arg-type]
        else:
            fut.set_exception(value)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result = fn()
        except BaseException as e:
            ok, value = False, e
        else:
            ok, value = True, result
        # RuntimeError: the loop closed while this call ran (the daemon stopped).
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, ok, value)

    threading.Thread(target=work, name=name, daemon=True).start()
    return await fut
