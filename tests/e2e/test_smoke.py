"""The shortest path through the daemon: a dropped file becomes an item."""

from __future__ import annotations

from tests.support.daemon import Env
from tests.support.wait import wait_for


def test_dropped_file_becomes_item(env: Env) -> None:
    drop = env.drop()
    env.write_config([{"name": "w", "source": str(drop), "dataset": "ds", "path": "/in"}])
    env.start()
    (drop / "sub").mkdir()
    (drop / "sub" / "a.dat").write_bytes(b"abc")
    items = wait_for(lambda: env.items_by_key().get("/in/sub/a.dat"), what="item /in/sub/a.dat")
    assert items["path"] == "/in/sub"
    assert items["slots"][0]["files"][0]["size"] == 3
    assert env.stop() == 0
