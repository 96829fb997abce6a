"""`ingestd serve` and the daemon's `http` backend, end to end: the real CLI as
subprocesses on loopback (issue 4's acceptance list).

1. serve + run: 1,000 files of mixed sizes end up as items with the files' digests
   (small ones through the batch route, POST /v1/batch; big ones blob by blob).
2. Faults, each ending with every file exactly once, version 1, right bytes: the server
   SIGKILLed and restarted 5 times during a sync; the daemon SIGKILLed and restarted
   during uploads; a fault-injecting proxy (tests/support/fault_proxy.py) answering 10 % of
   requests 500/503/429 and cutting 2 % of connections mid-body; a 200 MB resumable
   upload interrupted at ~50 % that resumes instead of starting over.
3. Security: tokens (401), `../` and absolute paths (400, nothing written outside the
   store), body limit (413), digest mismatch (400, no blob), no token in any log.
4. Memory: a 1 GiB upload keeps both processes' peak RSS under 150 MB.

And the other side of 2d: a big upload interrupted by the *daemon's* death resumes after
the restart (the server hands the same upload back for the same digest and size).

Sizes are chosen so the whole file runs in one to two minutes on 2 cores (about 2,300
files and 2.1 GB written, uploaded and verified in all; the 1 GiB test alone takes
12-45 s, under the 60 s that would make it `slow`). Faults are triggered by positive
signs of progress read from the server's /metrics or the daemon's log (never by
sleeping), and every outcome is checked on the server's side: `ingestd items ds --json`
through the http backend, and the blobs in the server's store.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Env, log_lines
from tests.support.serve import Proxy, Server, vm_hwm_kb
from tests.support.wait import wait_for

TOKEN_ENV = "INGESTD_E2E_HTTP_TOKEN"
MB = 1_000_000
MiB = 1 << 20
UPLOAD_ROUTE = "/v1/uploads/{upload_id}"


# --- files -----------------------------------------------------------------------------

_BLOCK = os.urandom(MiB)  # big files: this block behind a unique per-MiB header


class Tree:
    """Files in a drop folder and what each must become: key -> (digest, size)."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.expected: dict[str, tuple[str, int]] = {}
        self._n = 0

    def small(self, count: int, folder: str, lo: int = 1024, hi: int = 64 * 1024) -> None:
        """Random bytes, 1-64 KB by default; a unique header makes every digest distinct."""
        for i in range(count):
            self._n += 1
            size = self.rng.randint(lo, hi)
            header = f"small {self._n}\n".encode()
            body = header + self.rng.randbytes(size - len(header))
            rel = f"{folder}/d{i // 100:02d}/s{self._n:05d}.bin"
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
            self.expected["/" + rel] = ("sha256:" + hashlib.sha256(body).hexdigest(), size)

    def big(self, size: int, rel: str) -> tuple[str, int]:
        """`size` bytes written in 1 MiB pieces (real bytes, no holes), hashed on the way."""
        self._n += 1
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with open(path, "wb") as fh:
            written, block = 0, 0
            while written < size:
                header = f"big {self._n} block {block}\n".encode()
                piece = (header + _BLOCK[len(header) :])[: size - written]
                fh.write(piece)
                h.update(piece)
                written += len(piece)
                block += 1
        self.expected["/" + rel] = ("sha256:" + h.hexdigest(), size)
        return self.expected["/" + rel]

    @property
    def total(self) -> int:
        return len(self.expected)

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.expected.values())


# --- helpers -----------------------------------------------------------------------------


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh token, in the environment variable the daemon's config names (the CLI
    subprocesses inherit it)."""
    t = "tok-" + secrets.token_hex(24)
    monkeypatch.setenv(TOKEN_ENV, t)
    return t


def http_backend(url: str, token_env: str | None = TOKEN_ENV) -> dict[str, Any]:
    backend: dict[str, Any] = {"kind": "http", "url": url}
    if token_env is not None:
        backend["token_env"] = token_env
    return backend


def configure(env: Env, drop: Path, url: str, **top: Any) -> None:
    env.write_config(
        [{"name": "w", "source": str(drop), "dataset": "ds", "path": "/", "settle": "0.3s"}],
        backend=http_backend(url),
        workers=8,
        **top,
    )


def settled_clean(env: Env, total: int) -> dict[str, Any] | None:
    w = env.watch_status("w")
    if w["pending"] == 0 and w["failed"] == 0 and w["synced"] == total:
        return w
    return None


def wait_all_synced(env: Env, total: int, timeout: float = 120) -> None:
    wait_for(
        lambda: settled_clean(env, total),
        timeout=timeout,
        interval=0.3,
        what=f"all {total} items synced, none pending or failed",
    )


def metric(server: Server, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for key, value in server.metrics().items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def items_stored(server: Server) -> float:
    """Items this server life stored as new or changed, by PUT or in a batch (items
    sent again after a lost answer are `unchanged` and do not count)."""
    return sum(
        metric(server, "ingestd_serve_items_total", result=r) for r in ("created", "changed")
    )


def assert_exactly_once(env: Env, server: Server, expected: dict[str, tuple[str, int]]) -> None:
    """Every file is exactly one item, version 1, with its bytes; the server's store holds
    exactly those blobs, each hashing to its name."""
    items = env.items("ds")
    keys = [i["key"] for i in items]
    assert len(keys) == len(set(keys)), "duplicate keys"
    missing = sorted(set(expected) - set(keys))
    extra = sorted(set(keys) - set(expected))
    assert not missing and not extra, f"missing {missing[:5]} ({len(missing)}), extra {extra[:5]}"
    for item in items:
        digest, size = expected[item["key"]]
        assert item["version"] == 1, f"{item['key']} stored {item['version']} times"
        assert len(item["slots"]) == 1 and len(item["slots"][0]["files"]) == 1, item
        f = item["slots"][0]["files"][0]
        assert (f["digest"], f["size"]) == (digest, size), f"{item['key']}: wrong bytes"
    digests = {d for d, _ in expected.values()}
    assert server.blob_digests() == digests, "stray or missing blobs in the server's store"
    for digest in digests:
        hexdigest = digest.split(":", 1)[1]
        blob = server.store / "blobs" / "sha256" / hexdigest[:2] / hexdigest
        h = hashlib.sha256()
        with open(blob, "rb") as fh:
            while chunk := fh.read(4 * MiB):
                h.update(chunk)
        assert h.hexdigest() == hexdigest, f"blob {blob} does not hash to its name"


def assert_no_errors_logged(env: Env) -> None:
    errors = [e for e in env.log_events() if e.get("level") in ("error", "critical")]
    assert not errors, f"the daemon logged errors: {errors[:5]}"


def assert_token_absent(token: str, *texts: str) -> None:
    for text in texts:
        assert token not in text, "a token appears in a log"


# --- 1. serve + run ------------------------------------------------------------------------

SMALL_FILES = 990
BIG_SIZES = [5 * MB * (i + 1) for i in range(10)]  # 5, 10, ..., 50 MB: 275 MB in all


def test_serve_and_run_sync_1000_mixed_files(env: Env, make_server: Any, token: str) -> None:
    server: Server = make_server(token=token)
    drop = env.drop()
    tree = Tree(drop, seed=1)
    tree.small(SMALL_FILES, "small")
    for i, size in enumerate(BIG_SIZES):
        tree.big(size, f"big/b{i:02d}.bin")
    assert tree.total == 1000
    configure(env, drop, server.url)
    env.start()
    wait_all_synced(env, tree.total, timeout=180)
    assert env.stop() == 0
    assert_exactly_once(env, server, tree.expected)
    assert metric(server, "ingestd_serve_bytes_received_total") >= tree.bytes
    # The small files went in groups: a request carries dozens of items, not one.
    batches = metric(server, "ingestd_serve_requests_total", method="POST", route="/v1/batch")
    assert 0 < batches <= SMALL_FILES / 20, batches
    assert metric(server, "ingestd_serve_items_total", result="created") == tree.total
    assert_no_errors_logged(env)
    assert_token_absent(token, env.log(), server.log())


# --- 2a. the server is SIGKILLed 5 times during a sync ------------------------------------


def test_server_sigkilled_5_times_during_a_sync(env: Env, make_server: Any, token: str) -> None:
    server: Server = make_server(token=token)
    drop = env.drop()
    tree = Tree(drop, seed=2)
    # Enough small files for five server lives mid-sync: they travel 256 to a request.
    tree.small(3000, "small", hi=16 * 1024)
    for i, size in enumerate((6 * MB, 12 * MB, 18 * MB)):
        tree.big(size, f"big/b{i}.bin")
    tree.big(70 * MiB, "big/resumable.bin")  # over the 64 MiB threshold: chunked upload
    configure(env, drop, server.url)
    env.start()

    per_life = []
    for kill in range(5):
        # Kill once this life has stored a few dozen items: mid-sync, whatever the speed.
        wait_for(
            lambda: items_stored(server) >= 40,
            timeout=60,
            interval=0.02,
            what=f"40 items stored before kill {kill}",
        )
        per_life.append(items_stored(server))
        outages = len(log_lines(env, "ingestion server unreachable"))
        server.kill()
        # The daemon must meet the outage (a positive sign), then the server comes back.
        wait_for(
            lambda n=outages: len(log_lines(env, "ingestion server unreachable")) > n,
            timeout=30,
            interval=0.05,
            what=f"the daemon to notice outage {kill}",
        )
        server.start()

    wait_all_synced(env, tree.total)
    per_life.append(items_stored(server))
    print(f"\nitems stored per server life: {per_life}")
    assert per_life[-1] > 0, "the sync was over before the last kill"
    assert env.stop() == 0
    assert_exactly_once(env, server, tree.expected)
    assert_no_errors_logged(env)
    # One warning per outage and one info per recovery, not one per failed request.
    assert len(log_lines(env, "ingestion server unreachable")) == 5
    assert len(log_lines(env, "ingestion server reachable again")) == 5
    assert_token_absent(token, env.log(), server.log())


# --- 2b. the daemon is SIGKILLed during uploads ------------------------------------------


def test_daemon_sigkilled_during_uploads(env: Env, make_server: Any, token: str) -> None:
    server: Server = make_server(token=token)
    drop = env.drop()
    tree = Tree(drop, seed=3)
    tree.small(3000, "small", hi=16 * 1024)
    for i in range(3):
        tree.big(10 * MB, f"big/b{i}.bin")
    tree.big(70 * MiB, "big/resumable.bin")
    configure(env, drop, server.url)

    def patch_bytes() -> float:
        return metric(server, "ingestd_serve_bytes_received_total", route=UPLOAD_ROUTE)

    env.start()
    # Kill 1: in the middle of the resumable upload's chunks.
    wait_for(lambda: patch_bytes() >= 20 * MiB, 60, 0.01, "20 MiB of the big upload")
    env.kill()
    assert patch_bytes() < 70 * MiB, "the big upload finished before the kill"
    stored = items_stored(server)
    assert stored < tree.total
    # Kill 2: while small files stream in.
    env.restart()
    wait_for(lambda: items_stored(server) >= stored + 100, 60, 0.02, "100 more items")
    env.kill()
    stored2 = items_stored(server)
    assert stored2 < tree.total, "the sync was over before the second kill"
    # Kill 3: right after the restart, while it rescans and redoes what was in flight.
    env.restart()
    wait_for(lambda: items_stored(server) > stored2, 60, 0.01, "the first item after restart")
    env.kill()
    env.restart()
    wait_all_synced(env, tree.total)
    assert env.stop() == 0
    print(
        f"\nitems stored at the kills: {stored}, {stored2}; the 70 MiB file's chunks: "
        f"{patch_bytes() / MiB:.0f} MiB received (a restarted daemon starts a new upload)"
    )
    assert_exactly_once(env, server, tree.expected)
    assert_no_errors_logged(env)
    assert_token_absent(token, env.log(), server.log())


# --- 2c. a faulty network in between --------------------------------------------------------


def test_through_a_fault_injecting_proxy(env: Env, make_server: Any, token: str) -> None:
    server: Server = make_server(token=token)
    # Small files go 256 to a request, so the fault rates are higher than a real network's
    # to meet every kind of fault in the few hundred requests this sync makes; files
    # just over 1 MiB take the single-item routes (HEAD, PUT blob, PUT item).
    proxy = Proxy(
        env.root, server.url, error_rate=0.10, drop_rate=0.06, lose_answer_rate=0.03, seed=4
    )
    try:
        drop = env.drop()
        tree = Tree(drop, seed=4)
        tree.small(600, "small")
        tree.small(80, "medium", lo=1_100_000, hi=1_300_000)
        for i in range(3):
            tree.big(10 * MB, f"big/b{i}.bin")
        tree.big(70 * MiB, "big/resumable.bin")
        configure(env, drop, proxy.url)
        env.start()
        wait_all_synced(env, tree.total, timeout=240)
        assert env.stop() == 0
        stats = proxy.stats()
    finally:
        proxy.stop()
    print(f"\nfault proxy: {json.dumps(stats)}")
    # The server saw bodies end early (the cuts reached it, not just the client).
    assert metric(server, "ingestd_serve_errors_total", code="interrupted") >= 1
    configure(env, drop, server.url)  # list the items straight from the server
    # The faults happened, in every kind...
    assert set(stats["errors"]) == {"500", "503", "429"}, stats
    assert stats["errors_total"] >= 0.05 * stats["requests"], stats
    assert stats["dropped_mid_body"] >= 3, stats
    assert stats["lost_answers"] >= 1, stats
    # ...Retry-After was honoured (POST /v1/batch is one path for every group, and a
    # group already on its way when another got its 429 is no early retry)...
    early = [p for p in stats["early_retry_paths"] if not p.startswith("/v1/batch ")]
    assert not early, stats
    # ...and nothing was lost or stored twice.
    assert_exactly_once(env, server, tree.expected)
    assert_no_errors_logged(env)
    assert_token_absent(token, env.log(), server.log(), proxy.log())


# --- 2d. a big upload interrupted half-way resumes ----------------------------------------

RESUME_SIZE = 200 * MB


def test_interrupted_200mb_upload_resumes(env: Env, make_server: Any, token: str) -> None:
    server: Server = make_server(token=token)
    drop = env.drop()
    tree = Tree(drop, seed=5)
    tree.big(RESUME_SIZE, "big.bin")
    configure(env, drop, server.url)
    env.start()
    wait_for(
        lambda: server.bytes_received() >= RESUME_SIZE // 2,
        timeout=60,
        interval=0.005,
        what="half of the upload at the server",
    )
    first = server.bytes_received()
    server.kill()
    # Bytes that arrived after the last reading are in the upload's data file (or were
    # in a buffer: at most a few MiB): count the larger of the two.
    uploads = server.store / "uploads"
    on_disk = sum(p.stat().st_size for p in uploads.glob("*/data"))
    first = max(first, on_disk)
    assert first < 0.75 * RESUME_SIZE, f"the kill came late: {first} bytes already sent"
    server.start()
    wait_all_synced(env, 1)
    second = server.bytes_received()
    assert env.stop() == 0
    print(f"\nfirst life {first / MB:.1f} MB, second life {second / MB:.1f} MB")
    assert first + second < 1.5 * RESUME_SIZE, (first, second)
    assert second < RESUME_SIZE, "the upload started over instead of resuming"
    assert_exactly_once(env, server, tree.expected)
    assert not any(uploads.iterdir()), "the completed upload left files behind"
    assert_token_absent(token, env.log(), server.log())


def test_daemon_restart_resumes_a_big_upload(env: Env, make_server: Any, token: str) -> None:
    """The other side of 2d: the *daemon* dies half-way through a big upload."""
    server: Server = make_server(token=token)
    drop = env.drop()
    tree = Tree(drop, seed=7)
    tree.big(RESUME_SIZE, "big.bin")
    configure(env, drop, server.url)
    env.start()
    wait_for(
        lambda: server.bytes_received() >= RESUME_SIZE // 2,
        timeout=60,
        interval=0.005,
        what="half of the upload at the server",
    )
    env.kill()
    first = server.bytes_received()
    assert first < 0.75 * RESUME_SIZE, f"the kill came late: {first} bytes already sent"
    env.restart()
    wait_all_synced(env, 1)
    total = server.bytes_received()
    assert env.stop() == 0
    assert_exactly_once(env, server, tree.expected)
    print(f"\nreceived in all: {total / MB:.1f} MB for a {RESUME_SIZE / MB:.0f} MB file")
    leftovers = list((server.store / "uploads").iterdir())
    assert total < 1.5 * RESUME_SIZE, f"{total / MB:.1f} MB sent: the upload started over"
    assert not leftovers, f"the abandoned upload stays on the server: {leftovers}"


# --- 3. security -------------------------------------------------------------------------

BLOB_A = b"the bytes of blob a\n"
DIGEST_A = "sha256:" + hashlib.sha256(BLOB_A).hexdigest()


def _files_outside(root: Path, store: Path) -> set[Path]:
    return {p for p in root.rglob("*") if store not in p.parents and p != store and p.is_file()}


def test_tokens_are_required_and_never_logged(
    env: Env, make_server: Any, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    server: Server = make_server(token=token)
    wrong = "wrong-" + secrets.token_hex(24)
    monkeypatch.setenv("INGESTD_E2E_WRONG_TOKEN", wrong)

    routes = [
        ("PUT", "/v1/datasets/ds", None),
        ("HEAD", f"/v1/blobs/{DIGEST_A}", None),
        ("PUT", f"/v1/blobs/{DIGEST_A}", BLOB_A),
        ("POST", "/v1/uploads", b"{}"),
        ("PUT", "/v1/datasets/ds/items/a.txt", b'{"slots": [], "metadata": {}}'),
        ("POST", "/v1/batch", b"IDB1\x00\x00\x00\x02{}"),
        ("GET", "/v1/datasets/ds/items", None),
        ("DELETE", "/v1/datasets/ds/items/a.txt", None),
    ]
    for method, path, body in routes:
        for given in (None, wrong, token + "x", ""):
            ans = server.request(method, path, body, token=given)
            assert ans.status == 401, (method, path, given is None, ans)
            if method != "HEAD":
                assert ans.json()["code"] == "unauthorized", ans
        basic = server.request(
            method, path, body, headers={"Authorization": f"Basic {token}"}, token=None
        )
        assert basic.status == 401, (method, path, "Basic", basic)
    assert server.request("GET", "/healthz", token=None).status == 200
    assert server.blob_digests() == set(), "an unauthenticated request stored a blob"

    # Through the CLI: the daemon with a wrong token, and with none.
    drop = env.drop()
    (drop / "a.txt").write_bytes(BLOB_A)
    for label, token_env in (("wrong token", "INGESTD_E2E_WRONG_TOKEN"), ("no token", None)):
        env.write_config(
            [{"name": "w", "source": str(drop), "dataset": "ds", "settle": "0.1s"}],
            backend=http_backend(server.url, token_env),
        )
        items = env.cli("items", "ds")
        assert items.returncode != 0, (label, items.stdout)
        assert "401" in items.stderr, (label, items.stderr)
        sync = env.cli("sync")
        assert sync.returncode == 1, (label, sync.returncode, sync.stderr[-2000:])
        w = env.watch_status("w")
        assert w["failed"] == 1 and w["synced"] == 0, (label, w)
        assert "401" in w["last_errors"][0]["error"], (label, w["last_errors"])
        assert_token_absent(token, items.stdout, items.stderr, sync.stdout, sync.stderr)
        assert_token_absent(wrong, items.stdout, items.stderr, sync.stdout, sync.stderr)
        env.cli("retry", check=True)
    assert server.blob_digests() == set()

    # The right token works (so the refusals above were about the token).
    env.write_config(
        [{"name": "w", "source": str(drop), "dataset": "ds", "settle": "0.1s"}],
        backend=http_backend(server.url),
        log={"level": "debug", "format": "json"},
    )
    sync = env.cli("sync")
    assert sync.returncode == 0, sync.stderr[-2000:]
    assert [i["key"] for i in env.items("ds")] == ["/a.txt"]
    env.start()  # the daemon at debug level, for its log
    assert env.stop() == 0
    for secret in (token, wrong):
        assert_token_absent(secret, sync.stdout, sync.stderr, env.log(), server.log())


def test_path_traversal_is_refused_and_writes_nothing_outside_the_store(
    tmp_path: Path, make_server: Any, token: str
) -> None:
    server: Server = make_server(token=token)
    assert server.request("PUT", f"/v1/blobs/{DIGEST_A}", BLOB_A).status == 201
    manifest = json.dumps(
        {
            "slots": [
                {
                    "name": "0",
                    "type": "file",
                    "files": [{"name": "../../evil", "digest": DIGEST_A, "size": len(BLOB_A)}],
                }
            ],
            "metadata": {},
        }
    ).encode()
    before = _files_outside(tmp_path, server.store)
    bad = [
        "/v1/datasets/ds/items/../../evil",
        "/v1/datasets/ds/items/a/../../../../evil",
        "/v1/datasets/ds/items/%2e%2e/%2e%2e/evil",
        "/v1/datasets/ds/items/a/..%2F..%2F..%2Fevil",
        "/v1/datasets/ds/items/./evil",
        "/v1/datasets/ds/items//tmp/evil",  # an absolute path: an empty first segment
        "/v1/datasets/ds/items/%2Ftmp%2Fevil",
        "/v1/datasets/ds/items/a%00b/evil",
        "/v1/datasets/..%2F..%2Fevil/items/x",
        "/v1/datasets/%2e%2e/items/evil",
        "/v1/datasets/ds/items/" + "x" * 256,
    ]
    for path in bad:
        ans = server.request("PUT", path, manifest)
        assert ans.status == 400, (path, ans)
        assert ans.json()["code"] in ("bad_path", "bad_name"), (path, ans)
        ans = server.request("DELETE", path)
        assert ans.status == 400, ("DELETE", path, ans)
    # A path that is fine except for a name with odd characters is taken, as given.
    ok = server.request("PUT", "/v1/datasets/ds/items/a/b%20c%23d.txt", manifest)
    assert ok.status == 201, ok
    listed = server.request("GET", "/v1/datasets/ds/items").json()["items"]
    assert [i["key"] for i in listed] == ["/a/b c#d.txt"]
    assert server.request("GET", "/v1/datasets/..%2F..%2Fevil/items").status in (400, 404)
    after = _files_outside(tmp_path, server.store)
    assert after == before, f"files appeared outside the store: {sorted(after - before)}"
    # Above the test's folder too: `..` from the store's blob or upload folders.
    assert not list(tmp_path.parent.rglob("*evil*")), "something named evil was written"


def test_oversize_body_is_refused_with_413(env: Env, make_server: Any, token: str) -> None:
    limit = 64 * 1024
    server: Server = make_server(token=token, max_body=limit, name="small-limit")
    big = os.urandom(limit + 1)
    digest = "sha256:" + hashlib.sha256(big).hexdigest()
    ans = server.request("PUT", f"/v1/blobs/{digest}", big)
    assert ans.status == 413 and ans.json()["code"] == "too_large", ans
    ans = server.request(
        "PUT", f"/v1/blobs/{digest}", iter([big[:limit], big[limit:]]), chunked=True
    )
    assert ans.status == 413 and ans.json()["code"] == "too_large", ans
    assert server.request("HEAD", f"/v1/blobs/{digest}").status == 404
    ans = server.request("POST", "/v1/uploads", json.dumps({"size": len(big)}).encode())
    assert ans.status == 413, ans
    up = server.request("POST", "/v1/uploads", b"{}")
    assert up.status == 201, up
    ans = server.request(
        "PATCH",
        f"/v1/uploads/{up.json()['id']}",
        big,
        headers={"Content-Range": f"bytes 0-{len(big) - 1}/*"},
    )
    assert ans.status == 413, ans
    assert server.blob_digests() == set()

    # Through the daemon: the file over the limit fails with the reason; the other syncs.
    drop = env.drop()
    (drop / "big.bin").write_bytes(big)
    (drop / "ok.bin").write_bytes(BLOB_A)
    env.write_config(
        [{"name": "w", "source": str(drop), "dataset": "ds", "settle": "0.1s"}],
        backend=http_backend(server.url),
    )
    sync = env.cli("sync")
    assert sync.returncode == 1, sync.stderr[-2000:]
    w = env.watch_status("w")
    assert (w["synced"], w["failed"]) == (1, 1), w
    reason = w["last_errors"][0]["error"]
    assert "413" in reason and "big.bin" in reason, reason
    assert [i["key"] for i in env.items("ds")] == ["/ok.bin"]
    assert server.blob_digests() == {DIGEST_A}
    assert_token_absent(token, sync.stdout, sync.stderr, server.log())


def test_digest_mismatch_is_refused_and_stores_no_blob(make_server: Any, token: str) -> None:
    server: Server = make_server(token=token)
    other = b"not the bytes of blob a\n"
    ans = server.request("PUT", f"/v1/blobs/{DIGEST_A}", other)
    assert ans.status == 400, ans
    body = ans.json()
    assert body["code"] == "digest_mismatch", body
    assert body["expected"] == DIGEST_A
    assert body["actual"] == "sha256:" + hashlib.sha256(other).hexdigest()
    # The same through the resumable protocol.
    up = server.request("POST", "/v1/uploads", json.dumps({"digest": DIGEST_A}).encode())
    assert up.status == 201, up
    upload = f"/v1/uploads/{up.json()['id']}"
    ans = server.request(
        "PATCH", upload, other, headers={"Content-Range": f"bytes 0-{len(other) - 1}/*"}
    )
    assert ans.status == 202, ans
    ans = server.request("PUT", f"{upload}?digest={DIGEST_A}")
    assert ans.status == 400 and ans.json()["code"] == "digest_mismatch", ans
    assert server.request("HEAD", upload).status == 404, "a mismatched upload was kept"
    for digest in (DIGEST_A, body["actual"]):
        assert server.request("HEAD", f"/v1/blobs/{digest}").status == 404
    assert server.blob_digests() == set()
    assert not list((server.store / "uploads").iterdir())
    # A manifest naming the blob that was refused is refused too.
    manifest = json.dumps(
        {
            "slots": [
                {
                    "name": "0",
                    "type": "file",
                    "files": [{"name": "a", "digest": DIGEST_A, "size": len(BLOB_A)}],
                }
            ]
        }
    ).encode()
    ans = server.request("PUT", "/v1/datasets/ds/items/a", manifest)
    assert ans.status == 409 and ans.json()["missing"] == [DIGEST_A], ans


# --- 4. memory ---------------------------------------------------------------------------

GIB = 1 << 30
RSS_LIMIT_KB = 150 * 1000


def test_1gib_upload_keeps_both_processes_under_150mb(
    env: Env, make_server: Any, token: str
) -> None:
    server: Server = make_server(token=token)
    drop = env.drop()
    tree = Tree(drop, seed=6)
    tree.big(GIB, "huge.bin")
    configure(env, drop, server.url, log={"level": "info", "format": "json"})
    t = time.monotonic()
    env.start()
    wait_all_synced(env, 1, timeout=180)
    took = time.monotonic() - t
    daemon_kb = vm_hwm_kb(env.daemon.pid)  # type: ignore[union-attr]
    server_kb = vm_hwm_kb(server.proc.pid)  # type: ignore[union-attr]
    assert env.stop() == 0
    print(
        f"\n1 GiB synced in {took:.1f}s; peak RSS daemon {daemon_kb / 1000:.0f} MB, "
        f"server {server_kb / 1000:.0f} MB"
    )
    assert daemon_kb < RSS_LIMIT_KB, f"daemon peak RSS {daemon_kb} kB"
    assert server_kb < RSS_LIMIT_KB, f"server peak RSS {server_kb} kB"
    assert_exactly_once(env, server, tree.expected)
