"""Loopback ports for servers the tests start."""

from __future__ import annotations

import socket
from typing import Any

from aiohttp import web


def free_port() -> int:
    """A TCP port nobody listens on right now on 127.0.0.1 (kept for a server's restarts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def closed_port() -> int:
    """A loopback port with nothing listening (for 'unreachable' tests)."""
    return free_port()


async def listen(app: web.Application, port: int = 0, **runner: Any) -> tuple[web.AppRunner, int]:
    """`app` on 127.0.0.1 (`port` 0: any free one, else that one again after a stop);
    the runner, for `cleanup()`, and the port. `runner` options go to AppRunner (access
    logs are off)."""
    r = web.AppRunner(app, access_log=None, **runner)
    await r.setup()
    site = web.TCPSite(r, "127.0.0.1", port, reuse_address=True)
    await site.start()
    return r, int(r.addresses[0][1])
