"""`ingestd serve`: the ingestion HTTP API over the embedded store (see API.md)."""

from ingestd.server.app import make_app, serve
from ingestd.server.auth import ServeError, load_tokens

__all__ = ["ServeError", "load_tokens", "make_app", "serve"]
