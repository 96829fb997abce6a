"""`ingestd serve`: the ingestion HTTP API over the embedded store (see API.md).

Names load on first use: the CLI adds serve's options (server/options.py) to every
parse, which must not import aiohttp and the store for `ingestd status`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ingestd.server.app import make_app, serve
    from ingestd.server.auth import ServeError, load_tokens

__all__ = ["ServeError", "load_tokens", "make_app", "serve"]


def __getattr__(name: str) -> Any:
    if name in ("make_app", "serve"):
        from ingestd.server import app

        return getattr(app, name)
    if name in ("ServeError", "load_tokens"):
        from ingestd.server import auth

        return getattr(auth, name)
    raise AttributeError(f"module 'ingestd.server' has no attribute {name!r}")
