"""Fixtures of the end-to-end tests; the helpers behind them live in tests/support/."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Env
from tests.support.serve import Server


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.kill()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Factory: make_server(token=..., max_body=..., name=...) -> a started Server."""
    servers: list[Server] = []

    def make(token: str | None = "test-token-0123456789abcdef", **kw: Any) -> Server:
        s = Server(tmp_path, token, **kw)
        servers.append(s)
        s.start()
        return s

    yield make
    for s in servers:
        s.kill()
