"""The running daemon's control endpoint, end to end: `ingestd run` as a subprocess on
real folders, its address read from `state/control.addr` (the e2e configs listen on
127.0.0.1:0), `/metrics` parsed with prometheus-client's own parser while files are
dropped, and `/api/status` compared with `ingestd status --json`."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import Env, log_lines
from tests.support.wait import wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
W = (("watch", "w"),)


def control_url(env: Env) -> str:
    addr = env.state / "control.addr"
    wait_for(addr.exists, 30, what=f"the daemon to write {addr}")
    url = addr.read_text().strip()
    assert url.startswith("http://127.0.0.1:"), url
    return url


def fetch(url: str, timeout: float = 10) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def metrics(base: str) -> Samples:
    status, ctype, body = fetch(f"{base}/metrics")
    assert status == 200 and ctype.startswith("text/plain"), (status, ctype)
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def jpeg(path: Path, seed: int) -> int:
    Image.new("RGB", (320 + seed, 240), (seed * 40 % 255, 90, 160)).save(path, quality=90)
    return path.stat().st_size


def test_metrics_parse_and_counters_move_as_files_sync(env: Env) -> None:
    drop = env.drop()
    env.write_config([{"name": "w", "source": str(drop), "dataset": "ds"}])
    env.start()
    base = control_url(env)
    assert json.loads(fetch(f"{base}/healthz")[2]) == {"ok": True}

    m = metrics(base)
    assert m[("ingestd_items_synced_total", W)] == 0
    assert m[("ingestd_bytes_uploaded_total", W)] == 0
    assert m[("ingestd_queue_depth", ())] == 0
    assert m[("ingestd_config_reloads_total", ())] == 0
    assert m[("ingestd_rescans_total", W)] >= 1  # the start scan
    assert m[("ingestd_inotify_overflows_total", W)] == 0

    sizes = [jpeg(drop / f"a{i}.jpg", i) for i in range(3)]
    wait_for(
        lambda: metrics(base)[("ingestd_items_synced_total", W)] == 3,
        60,
        what="ingestd_items_synced_total to reach 3",
    )
    m1 = metrics(base)
    assert m1[("ingestd_bytes_uploaded_total", W)] == sum(sizes)  # sent as they are
    assert m1[("ingestd_items_planned_total", W)] == 3
    # Each new file counts once, however many events its write raised.
    assert m1[("ingestd_files_seen_total", W)] == 3
    assert m1[("ingestd_items", (("status", "synced"), *W))] == 3
    assert m1[("ingestd_items", (("status", "pending"), *W))] == 0
    assert m1[("ingestd_sync_latency_seconds_count", W)] == 3
    # Planned after the settle time (0.5 s) and synced soon after.
    assert 0 < m1[("ingestd_sync_latency_seconds_sum", W)] < 3 * 30

    more = [jpeg(drop / f"b{i}.jpg", 10 + i) for i in range(2)]
    (drop / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated nonsense")
    wait_for(
        lambda: (
            (s := metrics(base))[("ingestd_items_synced_total", W)] == 5
            and s[("ingestd_items_failed_total", W)] == 1
        ),
        60,
        what="5 synced and 1 failed in /metrics",
    )
    m2 = metrics(base)
    assert m2[("ingestd_bytes_uploaded_total", W)] == sum(sizes) + sum(more)
    assert m2[("ingestd_items", (("status", "failed"), *W))] == 1
    assert m2[("ingestd_items", (("status", "synced"), *W))] == 5
    assert m2[("ingestd_sync_latency_seconds_count", W)] == 5
    assert m2[("ingestd_items_planned_total", W)] == 6
    assert m2[("ingestd_files_seen_total", W)] == 6
    status = env.watch_status("w")
    assert (status["synced"], status["failed"]) == (5, 1)


def test_api_status_is_the_status_json(env: Env) -> None:
    drop = env.drop()
    env.write_config([{"name": "w", "source": str(drop), "dataset": "ds"}])
    jpeg(drop / "ok.jpg", 1)
    (drop / "bad.jpg").write_bytes(b"not an image at all")
    env.start()
    base = control_url(env)
    wait_for(
        lambda: (w := env.watch_status("w"))["synced"] == 1 and w["failed"] == 1,
        60,
        what="one synced and one failed item",
    )
    status, ctype, body = fetch(f"{base}/api/status")
    assert status == 200 and ctype.startswith("application/json")
    api: dict[str, Any] = json.loads(body)
    cli = env.status()
    assert api == cli
    assert api["daemon"] == {
        "running": True,
        "pid": env.daemon.pid if env.daemon else None,
        "live": True,
    }
    assert api["watches"][0]["last_errors"][0]["item"] == "/bad.jpg"


def test_port_taken_daemon_runs_without_the_endpoint(env: Env) -> None:
    drop = env.drop()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env.write_config(
            [{"name": "w", "source": str(drop), "dataset": "ds"}],
            status={"listen": f"127.0.0.1:{port}"},
        )
        env.start()
        jpeg(drop / "a.jpg", 3)
        wait_for(lambda: env.watch_status("w")["synced"] == 1, 60, what="a.jpg to sync")
    (line,) = [e for e in env.log_events() if e.get("field") == "status.listen"]
    assert line["level"] == "error" and line["listen"] == f"127.0.0.1:{port}"
    assert not (env.state / "control.addr").exists()
    assert env.daemon is not None and env.daemon.poll() is None


def test_unix_socket_endpoint(env: Env) -> None:
    import http.client

    drop = env.drop()
    env.write_config(
        [{"name": "w", "source": str(drop), "dataset": "ds"}], status={"listen": "unix:ctl.sock"}
    )
    env.start()
    addr = env.state / "control.addr"
    wait_for(addr.exists, 30, what="control.addr")
    sock_path = (env.state / "ctl.sock").resolve()
    assert addr.read_text().strip() == f"unix:{sock_path}"

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(str(sock_path))

    conn = UnixConnection("localhost", timeout=10)
    try:
        conn.request("GET", "/api/status")
        r = conn.getresponse()
        assert r.status == 200
        assert json.loads(r.read())["watches"][0]["name"] == "w"
    finally:
        conn.close()
    assert env.stop() == 0
    assert not addr.exists() and not sock_path.exists()
    assert log_lines(env, "control endpoint listening", address=f"unix:{sock_path}")
