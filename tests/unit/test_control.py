"""The control endpoint (daemon/ingestd/observe/control.py) in-process, over real HTTP on 127.0.0.1 and
a unix socket, against a small ControlTarget built from the real parts: the ledger, a
watch runner scanning a real folder, the sync pool with real media checks, and the
in-memory sink. Also the `ingestd serve` side of the dashboard (daemon/ingestd/dashboard/serve.py)
over a real store."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import numpy as np
import pytest
from ingestd.config import Config, parse_config
from ingestd.ledger import AsyncLedger
from ingestd.observe.control import ADDR_FILE, ControlServer, ControlTarget
from ingestd.observe.status import status_data
from ingestd.pipeline.outcome import Outcome
from ingestd.pipeline.pool import SyncPool
from ingestd.pipeline.runner import WatchRunner, make_runner, runner_stats
from ingestd.runtime.backend import side_for
from ingestd.sinks.memory import MemorySink
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from tests.support.wait import wait_until


def write_jpeg(
    path: Path, size: tuple[int, int] = (800, 600), color: tuple[int, ...] = (200, 40, 40)
) -> None:
    Image.new("RGB", size, color).save(path, quality=90)


def write_video(path: Path, frames: int = 20, fps: float = 10.0) -> None:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (320, 240))
    for i in range(frames):
        w.write(np.full((240, 320, 3), 10 * i % 255, np.uint8))
    w.release()


class Daemon:
    """A ControlTarget made of the daemon's real parts, in this process."""

    def __init__(self, config: Config, config_path: Path) -> None:
        self.config = config
        self.config_path = config_path
        self.ledger = AsyncLedger(config.state_dir)
        self.reloads = 0
        self.listeners: list[Callable[[Outcome], None]] = []
        self.retry_calls: list[tuple[str | None, str | None]] = []
        self.sink = MemorySink()
        self.runners: dict[str, WatchRunner] = {}
        self.pool: SyncPool | None = None
        self._pool_task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        await self.ledger.open()
        sides = {w.name: side_for(w, None) for w in self.config.watches}
        self.pool = SyncPool(
            self.ledger,
            self.sink,
            sides,
            2,
            on_outcome=self._outcome,
            spool_root=str(self.config.state_dir),
        )
        self._pool_task = asyncio.create_task(self.pool.run(poll=0.05))
        for w in self.config.watches:
            self.runners[w.name] = make_runner(w, self.ledger, self.pool.wake, observe=False)
            await self.runners[w.name].start()

    async def rescan(self) -> None:
        for r in self.runners.values():
            await r.scan("")

    async def close(self) -> None:
        for r in self.runners.values():
            await r.stop()
        assert self.pool is not None and self._pool_task is not None
        await self.pool.stop(1)
        self._pool_task.cancel()
        await asyncio.gather(self._pool_task, return_exceptions=True)
        await self.ledger.close()

    def _outcome(self, o: Outcome) -> None:
        for fn in self.listeners:
            fn(o)

    # -- ControlTarget --
    def status_json(self) -> dict[str, Any]:
        return status_data(self.config, self.config_path)

    async def retry(self, watch: str | None, source_id: str | None) -> int:
        self.retry_calls.append((watch, source_id))
        n = await self.ledger.call(self.ledger.sync.retry, watch, None, source_id)
        assert self.pool is not None
        self.pool.wake()
        return n

    def watch_stats(self) -> dict[str, dict[str, float]]:
        return runner_stats(self.runners)

    def queue_depth(self) -> int:
        return self.pool.inflight if self.pool is not None else 0

    def add_outcome_listener(self, fn: Callable[[Outcome], None]) -> None:
        self.listeners.append(fn)


def _conforms(d: Daemon) -> ControlTarget:
    return d  # type-checks that the test double is a ControlTarget


def make_config(tmp_path: Path, listen: str | None = "127.0.0.1:0") -> tuple[Config, Path]:
    (tmp_path / "drop").mkdir(exist_ok=True)
    data = {
        "state_dir": "state",
        "status": {"listen": listen},
        "backend": {"kind": "local", "path": "store"},
        "watches": [
            {"name": "w", "source": "drop", "dataset": "ds", "settle": "0.1s"},
        ],
    }
    path = tmp_path / "ingestd.yaml"
    path.write_text(json.dumps(data))
    return parse_config(data, tmp_path), path


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    config, path = make_config(tmp_path)
    drop = tmp_path / "drop"
    write_jpeg(drop / "a.jpg")
    Image.new("RGBA", (300, 500), (20, 180, 40, 255)).save(drop / "b.png")
    write_video(drop / "clip.mp4")
    (drop / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (drop / "notes.txt").write_bytes(b"plain text, no preview")
    d = Daemon(config, path)
    await d.open()
    yield d
    await d.close()


@pytest.fixture
async def served(daemon: Daemon) -> AsyncIterator[tuple[Daemon, ControlServer, str]]:
    server = ControlServer(_conforms(daemon), "127.0.0.1:0", daemon.config.state_dir)
    await server.start()
    assert server.address is not None
    # Wait until the five files are done: four synced, bad.jpg failed.
    await wait_until(lambda: _done(daemon), what="the dropped files to be synced or failed")
    yield daemon, server, server.address
    await server.stop()


async def _done(d: Daemon) -> bool:
    counts = await d.ledger.call(d.ledger.sync.counts)
    c = counts.get("w")
    return c is not None and c.synced == 4 and c.failed == 1 and d.queue_depth() == 0


async def get(url: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s, s.get(url, **kw) as r:
        return r.status, dict(r.headers), await r.read()


async def get_json(url: str) -> Any:
    status, _, body = await get(url)
    assert status == 200, body
    return json.loads(body)


async def post(url: str, data: bytes, content_type: str, **headers: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(url, data=data, headers={"Content-Type": content_type, **headers}) as r,
    ):
        return r.status, json.loads(await r.read())


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# --- routes and shapes ---------------------------------------------------------------------------


async def test_healthz_status_and_addr_file(served: tuple[Daemon, ControlServer, str]) -> None:
    d, _, base = served
    addr = (d.config.state_dir / ADDR_FILE).read_text().strip()
    assert addr == base and base.startswith("http://127.0.0.1:")
    assert await get_json(f"{base}/healthz") == {"ok": True}
    status = await get_json(f"{base}/api/status")
    assert status == d.status_json()
    (w,) = status["watches"]
    assert (w["name"], w["synced"], w["pending"], w["failed"]) == ("w", 4, 0, 1)
    assert w["last_errors"][0]["item"] == "/bad.jpg"
    info = await get_json(f"{base}/api/info")
    assert info["kind"] == "daemon" and info["watches"] == ["w"] and info["retry"] is True


async def test_status_is_cached_for_dashboards_and_fresh_on_request(
    served: tuple[Daemon, ControlServer, str],
) -> None:
    """Dashboards poll /api/status and share a report up to a second old; `ingestd
    status` asks `?fresh=1` so that it never shows what was true before a retry."""
    d, _, base = served
    before = await get_json(f"{base}/api/status")
    assert before["watches"][0]["failed"] == 1
    await d.ledger.call(d.ledger.sync.retry, "w", None, None)  # failed → pending
    # Within STATUS_TTL of the first request a plain one would answer 1 from the cache.
    fresh = await get_json(f"{base}/api/status?fresh=1")
    assert fresh["watches"][0]["failed"] == 0


async def test_items_recent_and_failed(served: tuple[Daemon, ControlServer, str]) -> None:
    _, _, base = served
    items = (await get_json(f"{base}/api/items"))["items"]
    by_key = {i["key"]: i for i in items}
    assert set(by_key) == {"/a.jpg", "/b.png", "/clip.mp4", "/notes.txt", "/bad.jpg"}
    for i in items:
        assert set(i) >= {
            "key",
            "watch",
            "dataset",
            "status",
            "last_error",
            "updated_at",
            "thumbnail",
        }
    assert [i["updated_at"] for i in items] == sorted(
        (i["updated_at"] for i in items), reverse=True
    )
    assert by_key["/a.jpg"]["status"] == "synced" and by_key["/a.jpg"]["thumbnail"]
    assert by_key["/clip.mp4"]["thumbnail"]  # synced as sampled frames, shown from the video
    assert by_key["/notes.txt"]["thumbnail"] is None  # no preview for plain files
    bad = by_key["/bad.jpg"]
    assert bad["status"] == "failed" and bad["thumbnail"] is None
    assert "bad.jpg" in bad["last_error"]

    failed = (await get_json(f"{base}/api/items?status=failed"))["items"]
    assert [i["key"] for i in failed] == ["/bad.jpg"]
    assert (await get_json(f"{base}/api/items?watch=other"))["items"] == []
    assert len((await get_json(f"{base}/api/items?limit=2"))["items"]) == 2
    status, _, body = await get(f"{base}/api/items?status=bogus")
    assert status == 400 and b"status must be" in body
    status, _, _ = await get(f"{base}/api/items?limit=-1")
    assert status == 400

    activity = await get_json(f"{base}/api/activity")
    w = activity["watches"]["w"]
    assert w["synced_last_minute"] == 4 and w["failed_last_minute"] == 1
    assert w["last_activity"] is not None and abs(w["last_activity"] - time.time()) < 60
    assert activity["queue_depth"] == 0 and activity["reloads"] == 0


async def test_thumbnails_are_jpegs_made_once(served: tuple[Daemon, ControlServer, str]) -> None:
    d, server, base = served
    items = {i["key"]: i for i in (await get_json(f"{base}/api/items"))["items"]}
    for key in ("/a.jpg", "/b.png", "/clip.mp4"):
        status, headers, body = await get(f"{base}/{items[key]['thumbnail']}")
        assert status == 200, (key, body)
        assert headers["Content-Type"] == "image/jpeg"
        im = Image.open(io.BytesIO(body))
        assert im.format == "JPEG" and max(im.size) <= 256
    assert server.thumbs.generated == 3
    made = sorted((d.config.state_dir / "thumbs").rglob("*.jpg"))
    assert len(made) == 3
    mtimes = [p.stat().st_mtime_ns for p in made]
    for key in ("/a.jpg", "/b.png", "/clip.mp4"):
        status, _, _ = await get(f"{base}/{items[key]['thumbnail']}")
        assert status == 200
    assert server.thumbs.generated == 3  # served from the cache
    assert [p.stat().st_mtime_ns for p in made] == mtimes
    # The failed item and the text file have none.
    for rel in ("bad.jpg", "notes.txt", "missing.jpg"):
        status, _, _ = await get(f"{base}/thumbs/w/{rel}")
        assert status == 404


async def test_changed_item_gets_a_new_thumbnail(served: tuple[Daemon, ControlServer, str]) -> None:
    d, _, base = served
    items = {i["key"]: i for i in (await get_json(f"{base}/api/items"))["items"]}
    old_url = items["/a.jpg"]["thumbnail"]
    _, _, old = await get(f"{base}/{old_url}")
    write_jpeg(d.config.watches[0].folder / "a.jpg", color=(20, 40, 220))  # now blue
    await d.rescan()

    async def new_url() -> str | None:
        items = {i["key"]: i for i in (await get_json(f"{base}/api/items"))["items"]}
        url = items["/a.jpg"]["thumbnail"]
        return url if url and url != old_url else None

    url = await wait_until(new_url, what="a new thumbnail URL for the changed a.jpg")
    _, _, new = await get(f"{base}/{url}")
    old_rgb = np.asarray(Image.open(io.BytesIO(old))).mean(axis=(0, 1))
    new_rgb = np.asarray(Image.open(io.BytesIO(new))).mean(axis=(0, 1))
    assert old_rgb[0] > old_rgb[2] and new_rgb[2] > new_rgb[0]


async def test_dashboard_page_and_assets(served: tuple[Daemon, ControlServer, str]) -> None:
    _, _, base = served
    status, headers, body = await get(f"{base}/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert b'<script src="dashboard.js"' in body
    assert b"http" not in body.replace(b"http-equiv", b"")  # no outside resources
    status, headers, body = await get(f"{base}/dashboard.js")
    assert status == 200 and "javascript" in headers["Content-Type"] and b"api/status" in body
    status, headers, _ = await get(f"{base}/dashboard.css")
    assert status == 200 and headers["Content-Type"].startswith("text/css")


# --- retry ---------------------------------------------------------------------------------------


async def test_retry_needs_json_and_requeues(served: tuple[Daemon, ControlServer, str]) -> None:
    d, server, base = served
    body = json.dumps({"watch": "w", "item": "bad.jpg"}).encode()
    # What an HTML form on another site can send: refused before anything happens.
    for ctype in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data"):
        status, answer = await post(f"{base}/api/retry", body, ctype)
        assert status == 415, ctype
        assert "application/json" in answer["error"]
    status, _ = await post(
        f"{base}/api/retry", body, "application/json", Origin="http://evil.example"
    )
    assert status == 403
    assert d.retry_calls == []

    status, answer = await post(f"{base}/api/retry", b"{not json", "application/json")
    assert status == 400
    status, answer = await post(
        f"{base}/api/retry", json.dumps({"item": "bad.jpg"}).encode(), "application/json"
    )
    assert status == 400 and "watch" in answer["error"]
    status, answer = await post(
        f"{base}/api/retry", json.dumps({"watch": "nope"}).encode(), "application/json"
    )
    assert status == 404 and "nope" in answer["error"]

    failed_before = server.metrics.failed.labels("w")._value.get()
    status, answer = await post(f"{base}/api/retry", body, "application/json", Origin=base)
    assert status == 200 and answer == {"retried": 1}
    assert d.retry_calls == [("w", "bad.jpg")]
    # The item is tried again (and, still corrupt, fails again with its reason).
    await wait_until(
        lambda: server.metrics.failed.labels("w")._value.get() == failed_before + 1,
        what="the retried item to be attempted again",
    )
    failed = (await get_json(f"{base}/api/items?status=failed"))["items"]
    assert [i["key"] for i in failed] == ["/bad.jpg"] and "bad.jpg" in failed[0]["last_error"]
    # A watch-wide retry of a watch with nothing else failed queues that one again.
    status, answer = await post(
        f"{base}/api/retry", json.dumps({"watch": "w", "item": None}).encode(), "application/json"
    )
    assert status == 200 and answer == {"retried": 1}


async def test_foreign_host_header_is_refused(served: tuple[Daemon, ControlServer, str]) -> None:
    _, _, base = served
    status, _, body = await get(f"{base}/api/status", headers={"Host": "attacker.example:80"})
    assert status == 403 and b"DNS rebinding" in body
    port = base.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
        status, _, _ = await get(f"{base}/healthz", headers={"Host": host})
        assert status == 200, host


# --- metrics -------------------------------------------------------------------------------------


async def test_metrics_parse_and_count(served: tuple[Daemon, ControlServer, str]) -> None:
    d, _, base = served
    status, headers, body = await get(f"{base}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name in (
        "ingestd_items_planned",
        "ingestd_items_synced",
        "ingestd_items_failed",
        "ingestd_bytes_uploaded",
        "ingestd_sync_latency_seconds",
        "ingestd_files_seen",
        "ingestd_rescans",
        "ingestd_inotify_overflows",
        "ingestd_items",
        "ingestd_queue_depth",
        "ingestd_config_reloads",
    ):
        assert name in families, name
    s = metric_samples(body.decode())
    w = (("watch", "w"),)
    assert s[("ingestd_items_synced_total", w)] == 4
    assert s[("ingestd_items_failed_total", w)] == 1
    assert s[("ingestd_items_planned_total", w)] == 5
    sent = sum(len(b) for b in d.sink.blobs.values())
    assert s[("ingestd_bytes_uploaded_total", w)] >= sent > 0
    assert s[("ingestd_sync_latency_seconds_count", w)] == 4
    assert s[("ingestd_rescans_total", w)] >= 1
    assert s[("ingestd_inotify_overflows_total", w)] == 0
    assert s[("ingestd_items", (("status", "synced"), ("watch", "w")))] == 4
    assert s[("ingestd_items", (("status", "failed"), ("watch", "w")))] == 1
    assert s[("ingestd_items", (("status", "pending"), ("watch", "w")))] == 0
    assert s[("ingestd_queue_depth", ())] == 0
    assert s[("ingestd_config_reloads_total", ())] == 0

    # Counters move as more files sync.
    for i in range(3):
        write_jpeg(d.config.watches[0].folder / f"more{i}.jpg", size=(64, 64))
    await d.rescan()

    async def synced_7() -> bool:
        _, _, body = await get(f"{base}/metrics")
        return metric_samples(body.decode()).get(("ingestd_items_synced_total", w)) == 7

    await wait_until(synced_7, what="ingestd_items_synced_total to reach 7")
    _, _, body = await get(f"{base}/metrics")
    s2 = metric_samples(body.decode())
    assert s2[("ingestd_bytes_uploaded_total", w)] > s[("ingestd_bytes_uploaded_total", w)]
    assert s2[("ingestd_items", (("status", "synced"), ("watch", "w")))] == 7
    assert s2[("ingestd_sync_latency_seconds_count", w)] == 7


# --- listening -----------------------------------------------------------------------------------


async def test_unix_socket(daemon: Daemon) -> None:
    state = daemon.config.state_dir
    server = ControlServer(daemon, "unix:ctl.sock", state)
    await server.start()
    sock = state / "ctl.sock"
    try:
        assert server.address == f"unix:{sock.resolve()}"
        assert (state / ADDR_FILE).read_text().strip() == server.address
        assert sock.is_socket()
        connector = aiohttp.UnixConnector(path=str(sock))
        async with aiohttp.ClientSession(connector=connector) as s:
            async with s.get("http://ingestd/healthz") as r:
                assert r.status == 200 and await r.json() == {"ok": True}
            async with s.get("http://ingestd/api/status") as r:
                assert (await r.json())["watches"][0]["name"] == "w"
    finally:
        await server.stop()
    assert not sock.exists()
    assert not (state / ADDR_FILE).exists()


async def test_addr_file_follows_the_server(daemon: Daemon) -> None:
    state = daemon.config.state_dir
    server = ControlServer(daemon, "127.0.0.1:0", state)
    await server.start()
    addr = (state / ADDR_FILE).read_text().strip()
    port = int(addr.rsplit(":", 1)[1])
    assert addr == f"http://127.0.0.1:{port}" and port > 0
    assert await get_json(f"{addr}/healthz") == {"ok": True}
    await server.stop()
    assert not (state / ADDR_FILE).exists()
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(f"{addr}/healthz")


async def test_port_in_use_is_logged_not_raised(daemon: Daemon) -> None:
    state = daemon.config.state_dir
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ControlServer(daemon, f"127.0.0.1:{port}", state)
        with capture_logs() as logs:
            await server.start()  # must not raise
        await server.stop()
    assert server.address is None
    assert not (state / ADDR_FILE).exists()
    errors = [e for e in logs if e["log_level"] == "error"]
    assert errors and errors[0]["field"] == "status.listen"
    assert "status.listen" in errors[0]["event"] and errors[0]["listen"] == f"127.0.0.1:{port}"


async def test_no_listen_means_no_server(daemon: Daemon) -> None:
    server = ControlServer(daemon, None, daemon.config.state_dir)
    await server.start()
    await server.stop()
    assert server.address is None and daemon.listeners == []


# --- `ingestd serve` ----------------------------------------------------------------------------


async def _serve_app(store: Path, tokens: tuple[str, ...] = ()) -> tuple[Any, str]:
    from aiohttp import web
    from ingestd.server.app import make_app

    runner = web.AppRunner(make_app(store, tokens), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


def _fill_store(store: Path, tmp_path: Path) -> None:
    from ingestd.store import Store

    img = tmp_path / "pic.jpg"
    write_jpeg(img, size=(1000, 500))
    video = tmp_path / "v.mp4"
    write_video(video)
    with Store.open(store) as st:
        d1 = st.blobs.put_file(img)
        d2 = st.blobs.put_file(video)
        st.catalog.upsert_item(
            "cams",
            "/day 1",
            "pic #1.jpg",
            [
                {
                    "name": "0",
                    "type": "image",
                    "files": [{"name": "pic.jpg", "digest": d1.digest, "size": d1.size}],
                }
            ],
            {},
        )
        st.catalog.upsert_item(
            "cams",
            "/",
            "clip.mp4",
            [
                {
                    "name": "0",
                    "type": "video",
                    "files": [{"name": "v.mp4", "digest": d2.digest, "size": d2.size}],
                }
            ],
            {},
        )
        st.catalog.upsert_item(
            "cams",
            "/",
            "remote",
            [{"name": "0", "type": "image", "files": [{"name": "r.jpg", "url": "s3://b/r.jpg"}]}],
            {},
        )


async def test_serve_dashboard_lists_datasets_and_thumbnails(tmp_path: Path) -> None:
    store = tmp_path / "store"
    _fill_store(store, tmp_path)
    runner, base = await _serve_app(store)
    try:
        status, headers, body = await get(f"{base}/")
        assert status == 200 and b"dashboard.js" in body
        assert (await get_json(f"{base}/api/info"))["kind"] == "serve"
        assert (await get_json(f"{base}/api/datasets")) == {
            "datasets": [{"name": "cams", "items": 3}]
        }
        items = {i["key"]: i for i in (await get_json(f"{base}/api/datasets/cams/items"))["items"]}
        assert set(items) == {"/day 1/pic #1.jpg", "/clip.mp4", "/remote"}
        assert items["/remote"]["thumbnail"] is None  # no bytes in the store
        for key in ("/day 1/pic #1.jpg", "/clip.mp4"):
            url = items[key]["thumbnail"]
            status, headers, body = await get(f"{base}/{url}")
            assert status == 200 and headers["Content-Type"] == "image/jpeg", (key, body)
            assert max(Image.open(io.BytesIO(body)).size) == 256
        assert len(list((store / "thumbs").rglob("*.jpg"))) == 2
        status, _, _ = await get(f"{base}/api/datasets/nope/items")
        assert status == 404
    finally:
        await runner.cleanup()


async def test_serve_dashboard_data_needs_the_token_when_the_server_has_one(tmp_path: Path) -> None:
    store = tmp_path / "store"
    _fill_store(store, tmp_path)
    runner, base = await _serve_app(store, ("secret-token-123",))
    try:
        status, _, _ = await get(f"{base}/")
        assert status == 200  # the page itself holds no data
        assert (await get_json(f"{base}/api/info"))["auth"] is True
        for path in ("/api/datasets", "/api/datasets/cams/items", "/thumbs/cams/clip.mp4"):
            status, _, _ = await get(f"{base}{path}")
            assert status == 401, path
            status, _, _ = await get(
                f"{base}{path}", headers={"Authorization": "Bearer secret-token-123"}
            )
            assert status == 200, path
    finally:
        await runner.cleanup()
