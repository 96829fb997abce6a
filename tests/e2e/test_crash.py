"""Crash safety: SIGKILL the daemon at random moments while it syncs, restart it, and
check that in the end every file is in the store exactly once, intact, as version 1.

The random delays before each kill are the test's input (seeded, so a failure can be
replayed with the printed seed); every wait for the daemon's state is a `wait_for`.
"""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import time
from pathlib import Path

from tests.support.daemon import Env
from tests.support.wait import wait_for

SEED = int(os.environ.get("INGESTD_CRASH_SEED", "20240611"))
SMALL_FILES = 1_000
BIG_FILES = 4  # 2-5 MB each, so some kills land in the middle of a copy
KILLS = 8
FILES_WHILE_DOWN = 800  # created while the daemon is down, before some restarts


class Tree:
    """The drop folder's files and the content each one must end up with."""

    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root = root
        self.rng = rng
        self.content: dict[str, bytes] = {}  # relpath -> bytes
        self._n = 0

    def add_small(self, count: int, folder: str) -> None:
        for _ in range(count):
            self._n += 1
            # A unique header makes every content distinct, so digests identify files.
            body = f"file {self._n}\n".encode() + self.rng.randbytes(self.rng.randint(50, 4000))
            self._write(f"{folder}/s{self._n:05d}.bin", body)

    def add_big(self, count: int, folder: str) -> None:
        for _ in range(count):
            self._n += 1
            size = self.rng.randint(2 << 20, 5 << 20)
            body = f"big {self._n}\n".encode() + self.rng.randbytes(size)
            self._write(f"{folder}/b{self._n:05d}.bin", body)

    def _write(self, rel: str, body: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        self.content[rel] = body

    def expected(self) -> dict[str, tuple[str, int]]:
        """key -> (digest, size), keys as the watch (path "/", preserve_folders) maps them."""
        return {
            "/" + rel: ("sha256:" + hashlib.sha256(b).hexdigest(), len(b))
            for rel, b in self.content.items()
        }


def _store_item_count(store: Path) -> int:
    """Items in the store's catalog (read directly: the daemon is dead when this runs)."""
    catalog = store / "catalog.sqlite"
    if not catalog.exists():
        return 0
    conn = sqlite3.connect(f"file:{catalog}?mode=ro", uri=True, timeout=10)
    try:
        return int(conn.execute("SELECT count(*) FROM items").fetchone()[0])
    except sqlite3.OperationalError:  # killed before the schema was committed
        return 0
    finally:
        conn.close()


def _temp_files(store: Path) -> int:
    tmp = store / "tmp"
    return len(os.listdir(tmp)) if tmp.is_dir() else 0


def _settled_clean(env: Env, total: int) -> dict | None:
    w = env.watch_status("w")
    if w["pending"] == 0 and w["failed"] == 0 and w["synced"] == total:
        return w
    return None


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(env: Env) -> None:
    # Separate generators: the kill delays are fixed by the seed alone, whatever the
    # timing-dependent choice of when to add files does to the content generator.
    kill_rng = random.Random(SEED)
    delays = [kill_rng.uniform(0.05, 1.5) for _ in range(KILLS)]
    drop = env.drop()
    tree = Tree(drop, random.Random(SEED + 1))
    for d in range(10):
        tree.add_small(SMALL_FILES // 10, f"d{d:02d}")
    tree.add_big(BIG_FILES, "big")
    env.write_config(
        [{"name": "w", "source": str(drop), "dataset": "ds", "path": "/", "settle": "0.2s"}],
        workers=8,
        log={"level": "info", "format": "json"},
    )

    kills: list[dict] = []
    batch = FILES_WHILE_DOWN
    for k, delay in enumerate(delays):
        env.restart()
        # The delay is the experiment's input, not a wait for some state.
        time.sleep(delay)
        env.kill()
        kills.append(
            {
                "kill": k,
                "delay": round(delay, 3),
                "files": len(tree.content),
                "items": _store_item_count(env.store),
                "temps": _temp_files(env.store),
            }
        )
        caught_up = kills[-1]["items"] == kills[-1]["files"]
        if k < KILLS - 1 and (caught_up or k % 3 == 0):
            # More files while the daemon is down: the next start must find them, and
            # has a backlog again, so the next kill is likely to land mid-sync too. A
            # daemon that caught up before the kill gets a bigger backlog next time, so
            # the test keeps killing mid-sync on faster machines too.
            if caught_up:
                batch = min(batch * 2, 8 * FILES_WHILE_DOWN)
            tree.add_small(batch, f"down{k:02d}")
            tree.add_big(2, f"down{k:02d}")

    print(f"\ncrash test seed {SEED}")
    for row in kills:
        print(row)
    mid_sync = [r for r in kills if r["items"] < r["files"]]
    mid_copy = [r for r in kills if r["temps"]]
    print(f"{len(mid_sync)} kills mid-sync, {len(mid_copy)} with a blob copy in flight")
    assert len(mid_sync) >= 3, f"too few kills landed mid-sync (seed {SEED}): {kills}"

    env.restart()
    total = len(tree.content)
    wait_for(
        lambda: _settled_clean(env, total),
        timeout=180,
        interval=0.5,
        what=f"all {total} items synced, none pending or failed",
    )
    assert env.stop() == 0

    expected = tree.expected()
    items = env.items("ds")
    keys = [i["key"] for i in items]
    assert len(keys) == len(set(keys)), "duplicate keys in the store"
    missing = sorted(set(expected) - set(keys))
    extra = sorted(set(keys) - set(expected))
    assert not missing and not extra, f"missing {missing[:5]}…, extra {extra[:5]}…"
    for item in items:
        digest, size = expected[item["key"]]
        assert item["version"] == 1, f"{item['key']} was uploaded again as an update"
        assert len(item["slots"]) == 1, item
        files = item["slots"][0]["files"]
        assert len(files) == 1, item
        assert files[0]["digest"] == digest, f"{item['key']}: wrong bytes stored"
        assert files[0]["size"] == size, f"{item['key']}: wrong size"

    blobs_root = env.store / "blobs" / "sha256"
    blob_digests = set()
    for shard in sorted(blobs_root.iterdir()):
        for blob in shard.iterdir():
            actual = hashlib.sha256(blob.read_bytes()).hexdigest()
            assert actual == blob.name, f"blob {blob} does not hash to its name (partial?)"
            assert blob.name[:2] == shard.name
            blob_digests.add("sha256:" + blob.name)
    assert blob_digests == {d for d, _ in expected.values()}, "stray or missing blobs"
    assert _temp_files(env.store) == 0, "temp files of killed runs were not cleaned up"

    errors = [e for e in env.log_events() if e.get("level") in ("error", "critical")]
    assert not errors, f"the daemon logged errors: {errors[:5]}"
