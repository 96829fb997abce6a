"""Soak: faults injected while writers work, then convergence checked against the truth
(issue 14, point 10). The real daemon (`ingestd run`) and, for one scenario, the real
server (`ingestd serve`) run as subprocesses on real folders; this script only writes
files, injects the fault, and reads what ended up in the store.

    .venv/bin/python bench/soak.py [--quick] [--only SCENARIO[,SCENARIO]] [--json out.json]
                                   [--seed N] [--deadline SECONDS]

Scenarios (`--only` takes these names):

  sigkill          SIGKILL a busy daemon N times while a writer creates, overwrites
                   (temp + rename, and in place), renames over and deletes files; restart
                   after each kill (on_delete: delete).
  overflow         a burst of thousands of files (plus overwrites and deletes of older
                   files) into a daemon whose inotify queue holds 64 events (root: lowers
                   /proc/sys/fs/inotify/max_queued_events while the daemon starts, then
                   restores it; the kernel sizes a queue when it is created).
  backend_restart  `http` backend: `ingestd serve` is SIGKILLed and restarted several
                   times while files arrive.
  disk_full_store  the local store's root on an 8 MiB tmpfs, filled to ENOSPC with a
                   filler file while files arrive, then freed (root: mount).
  disk_full_state  the same with state_dir (the ledger) on the tmpfs.
  bad_names        non-UTF-8 file and folder names, FIFOs named like media files, a FIFO
                   where a sidecar is expected, a 251-byte name whose sidecar name is too
                   long, beside normal files; then SIGTERM, timed.

Truth is the drop folder at the end: every regular file (temp and hidden names and
sidecars aside) with its sha256. Per scenario:

  lost        a file present at the end whose item is missing from the store, or holds
              content the file never had
  duplicated  more than one store item for one file, plus re-sends: "synced" log lines
              for the same (item, version), i.e. the same content stored again (a
              repeated put the store recognised, changed=false, is noted apart)
  stale       an item holding an older content of its file (or of the file renamed onto
              it), or an item for a deleted file (on_delete: delete)
  converge s  from the end of the fault to the first poll (every 0.2 s) at which the
              store matches the truth; "missed" past the deadline

The exit code is 1 when any scenario has lost, duplicated or stale items, missed its
deadline, or failed a check of its own (daemon exited during the fault, a bad name
neither synced nor reported, a slow SIGTERM); 0 otherwise (skips are printed, with the
reason, and do not fail the run).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import random
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from common import ENV, INGESTD, REPO, Workspace, machine, table

DATASET = "ds"
WATCH = "w"
SETTLE = "0.2s"
POLL = 0.2  # convergence polling interval, seconds
QUIET_WAIT = 15.0  # after convergence: how long to wait for the ledger to show 0 pending
TERM_BOUND = 10.0  # SIGTERM must end the daemon within this many seconds
TEMP_SUFFIXES = (b".tmp", b".part", b".crdownload", b".swp")
SCENARIOS = [
    "sigkill",
    "overflow",
    "backend_restart",
    "disk_full_store",
    "disk_full_state",
    "bad_names",
]


def say(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: bytes | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def display_key(rel: bytes) -> str:
    """The item key a non-UTF-8 relpath gets (core/rawnames.py `display`: each byte that
    is not UTF-8 becomes %XX)."""
    text = os.fsdecode(rel)
    return "/" + "".join(
        f"%{ord(c) - 0xDC00:02X}" if 0xDC80 <= ord(c) <= 0xDCFF else c for c in text
    )


def ignored(name: bytes) -> bool:
    """Names the daemon always ignores (core/filters.py temp names)."""
    return name.startswith(b".") or name.startswith(b"~$") or name.endswith(TEMP_SUFFIXES)


# --- truth: the drop folder at the end ---------------------------------------------------


@dataclass
class Truth:
    files: dict[str, str]  # key -> digest, UTF-8 names
    raw: dict[str, str]  # display key -> digest, names that are not UTF-8
    others: list[str]  # not regular files (FIFOs, ...), display keys


def scan_truth(drop: Path, sidecars: bool = False) -> Truth:
    root = os.fsencode(drop)
    files: dict[str, str] = {}
    raw: dict[str, str] = {}
    others: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not ignored(d)]
        for fn in filenames:
            if ignored(fn) or (sidecars and fn.endswith(b".json")):
                continue
            p = os.path.join(dirpath, fn)
            rel = os.path.relpath(p, root)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                others.append(display_key(rel))
                continue
            try:
                key = "/" + rel.decode("utf-8")
            except UnicodeDecodeError:
                raw[display_key(rel)] = file_digest(p)
                continue
            files[key] = file_digest(p)
    return Truth(files, raw, others)


# --- the store -----------------------------------------------------------------------------


def item_digest(slots: list[dict[str, Any]]) -> str | None:
    """The content of a one-file item; None when the item has another shape."""
    if len(slots) == 1 and len(slots[0].get("files", [])) == 1:
        return slots[0]["files"][0].get("digest")
    return None


def read_catalog(store: Path) -> list[tuple[str, int, str | None]] | None:
    """(key, version, digest) per item, read-only from the store's catalog while the
    daemon or server writes it; None when it cannot be read right now."""
    catalog = store / "catalog.sqlite"
    if not catalog.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{catalog}?mode=ro", uri=True, timeout=2)
    except sqlite3.Error:
        return None
    try:
        rows = conn.execute(
            "SELECT key, version, slots FROM items WHERE dataset=?", (DATASET,)
        ).fetchall()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return [(k, v, item_digest(json.loads(s))) for k, v, s in rows]


def store_matches(
    rows: list[tuple[str, int, str | None]], want: dict[str, str], extra_ok: bool
) -> bool:
    have: dict[str, str | None] = {}
    for k, _, d in rows:
        if k in have:
            return False
        have[k] = d
    if any(have.get(k) != d for k, d in want.items()):
        return False
    return extra_ok or set(have) <= set(want)


# --- processes -------------------------------------------------------------------------------


class DaemonExited(RuntimeError):
    pass


class Daemon:
    """`ingestd run -c CONFIG` as a subprocess, its output appended to one log file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.exits: list[int] = []  # return codes of runs that ended on their own

    def _started_count(self) -> int:
        try:
            return self.log_path.read_bytes().count(b'"ingestd started"')
        except FileNotFoundError:
            return 0

    def start(self, timeout: float = 60) -> float:
        """Start, and return when this run has logged "ingestd started" (its spawn time)."""
        assert not self.alive(), "daemon already running"
        before = self._started_count()
        with open(self.log_path, "ab") as log:
            spawned = time.monotonic()
            self.proc = subprocess.Popen(
                [*INGESTD, "run", "-c", str(self.config)],
                cwd=REPO,
                stdout=log,
                stderr=log,
                env=ENV,
            )
        deadline = time.monotonic() + timeout
        while self._started_count() <= before:
            rc = self.proc.poll()
            if rc is not None:
                self.exits.append(rc)
                raise DaemonExited(f"daemon exited {rc} before starting; see {self.log_path}")
            if time.monotonic() > deadline:
                raise DaemonExited(f"daemon did not log 'ingestd started' in {timeout:.0f}s")
            time.sleep(0.05)
        return spawned

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> int | None:
        """The return code if the daemon ended on its own since the last check."""
        if self.proc is not None and self.proc.poll() is not None:
            rc = self.proc.returncode
            self.exits.append(rc)
            self.proc = None
            return rc
        return None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(timeout=20)
        self.proc = None

    def term(self, bound: float = TERM_BOUND) -> tuple[int | None, float]:
        """SIGTERM; (return code, seconds to exit). Past `bound`: SIGKILL, code None."""
        if not self.alive():
            return (self.proc.returncode if self.proc else None), 0.0
        assert self.proc is not None
        t = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc: int | None = self.proc.wait(timeout=bound)
        except subprocess.TimeoutExpired:
            rc = None
            self.proc.kill()
            self.proc.wait(timeout=20)
        secs = time.monotonic() - t
        self.proc = None
        return rc, secs

    def events(self) -> list[dict[str, Any]]:
        out = []
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            if not line.startswith("{"):
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`ingestd serve` on a fixed loopback port, so the daemon finds it after restarts."""

    def __init__(self, root: Path, token: str) -> None:
        self.store = root / "server-store"
        self.log_path = root / "server.log"
        self.tokens = root / "server-tokens"
        self.tokens.write_text(token + "\n")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        cmd = [*INGESTD, "serve", "--store", str(self.store), "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--log-format", "json", "--token-file", str(self.tokens)]
        env = {k: v for k, v in ENV.items() if k != "INGESTD_SERVE_TOKENS"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ingestd serve exited {self.proc.returncode}: {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("ingestd serve did not answer /healthz")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


def cli(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*INGESTD, *args, "-c", str(config)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        errors="replace",
    )


def status_json(config: Path) -> dict[str, Any] | None:
    try:
        out = cli(config, "status", "--json")
        return json.loads(out.stdout) if out.returncode == 0 else None
    except (subprocess.SubprocessError, json.JSONDecodeError):
        return None


def watch_status(config: Path) -> dict[str, Any] | None:
    s = status_json(config)
    if s is None:
        return None
    return next((w for w in s.get("watches", []) if w.get("name") == WATCH), None)


def write_config(
    root: Path,
    *,
    drop: Path,
    state: Path,
    store: Path | None = None,
    http: tuple[str, Path] | None = None,
    on_delete: str = "delete",
    metadata: dict[str, Any] | None = None,
    workers: int = 4,
) -> Path:
    backend: dict[str, Any]
    if http is not None:
        token_file = root / "daemon-token"
        token_file.write_text(http[1].read_text())
        backend = {"kind": "http", "url": http[0], "token_file": str(token_file)}
    else:
        assert store is not None
        backend = {"kind": "local", "path": str(store)}
    watch: dict[str, Any] = {
        "name": WATCH,
        "source": str(drop),
        "dataset": DATASET,
        "path": "/",
        "settle": SETTLE,
        "on_delete": on_delete,
        "max_delete": "100%",
    }
    if metadata:
        watch["metadata"] = metadata
    data = {
        "state_dir": str(state),
        "log": {"level": "info", "format": "json"},
        "status": {"listen": "127.0.0.1:0"},
        "watch_config": False,
        "workers": workers,
        "backend": backend,
        "watches": [watch],
    }
    path = root / "ingestd.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --- writers ---------------------------------------------------------------------------------


class Writer(threading.Thread):
    """Changes files under `drop` at a steady pace from a seeded generator, and keeps
    every content each path has held (`history`), to tell stale items from lost ones.
    Paths are never reused after a delete, so an (item, version) names one content."""

    def __init__(
        self,
        drop: Path,
        rng: random.Random,
        *,
        folders: int = 4,
        max_files: int = 200,
        pace: float = 0.02,
        weights: dict[str, int] | None = None,
        big_share: float = 0.0,
        sizes: tuple[int, int] = (200, 16_000),
        prefix: str = "f",
    ) -> None:
        super().__init__(daemon=True, name="soak-writer")
        self.drop = drop
        self.rng = rng
        self.folders = [f"d{i}" for i in range(folders)]
        self.max_files = max_files
        self.pace = pace
        self.weights = weights or {
            "create": 40,
            "overwrite_atomic": 20,
            "overwrite_in_place": 10,
            "rename_over": 10,
            "delete": 10,
        }
        self.big_share = big_share
        self.sizes = sizes
        self.prefix = prefix
        self.current: dict[str, str] = {}  # relpath -> digest
        self.history: dict[str, set[str]] = {}  # relpath -> every digest it held
        self.ops: Counter[str] = Counter()
        self.errors: list[str] = []
        self._n = 0
        self._halt = threading.Event()
        for f in self.folders:
            (drop / f).mkdir(parents=True, exist_ok=True)

    # content: a unique header, so every write has its own digest
    def _content(self) -> bytes:
        self._n += 1
        if self.big_share and self.rng.random() < self.big_share:
            size = self.rng.randint(256 << 10, 1536 << 10)
            return f"{self.prefix} {self._n} big\n".encode() + os.urandom(size)
        size = self.rng.randint(*self.sizes)
        return f"{self.prefix} {self._n}\n".encode() + self.rng.randbytes(size)

    def expected(self) -> dict[str, str]:
        """What the store should hold now: key -> digest."""
        return {"/" + rel: d for rel, d in self.current.items()}

    def _record(self, rel: str, data: bytes) -> None:
        d = digest_of(data)
        self.current[rel] = d
        self.history.setdefault(rel, set()).add(d)

    def create(self, via_temp: bool | None = None) -> None:
        folder = self.rng.choice(self.folders)
        self._n += 1
        rel = f"{folder}/{self.prefix}{self._n:06d}.bin"
        data = self._content()
        path = self.drop / rel
        if via_temp if via_temp is not None else self.rng.random() < 0.5:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        else:
            with open(path, "wb") as fh:  # in place, in two writes
                half = len(data) // 2
                fh.write(data[:half])
                fh.flush()
                fh.write(data[half:])
        self._record(rel, data)

    def overwrite_atomic(self) -> None:
        rel = self.rng.choice(list(self.current))
        data = self._content()
        path = self.drop / rel
        tmp = path.with_name(f".{path.name}.{self._n}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self._record(rel, data)

    def overwrite_in_place(self) -> None:
        rel = self.rng.choice(list(self.current))
        data = self._content()
        with open(self.drop / rel, "r+b") as fh:
            fh.truncate(0)
            half = len(data) // 2
            fh.write(data[:half])
            fh.flush()
            time.sleep(0.005)
            fh.write(data[half:])
        self._record(rel, data)

    def rename_over(self) -> None:
        if len(self.current) < 2:
            return self.create()
        a, b = self.rng.sample(list(self.current), 2)
        os.replace(self.drop / a, self.drop / b)
        d = self.current.pop(a)
        self.current[b] = d
        self.history.setdefault(b, set()).add(d)

    def delete(self) -> None:
        rel = self.rng.choice(list(self.current))
        os.unlink(self.drop / rel)
        del self.current[rel]

    def step(self) -> None:
        ops = dict(self.weights)
        if len(self.current) >= self.max_files:
            ops["create"] = 0
        if not self.current:
            ops = {"create": 1}
        names = [k for k, v in ops.items() if v > 0]
        op = self.rng.choices(names, [ops[k] for k in names])[0]
        getattr(self, op)()
        self.ops[op] += 1

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.step()
            except OSError as e:  # e.g. ENOSPC is not ours: the drop folder is on disk
                self.errors.append(f"{type(e).__name__}: {e}")
            self._halt.wait(self.pace)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout=30)


# --- results ---------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    status: str = "pass"  # pass | FAIL | skip
    files: int = 0
    lost: int = 0
    duplicated: int = 0
    stale: int = 0
    converge_s: float | None = None
    deadline_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def fail(self, why: str) -> None:
        self.failures.append(why)

    def finish(self) -> Result:
        if self.status == "skip":
            return self
        if self.lost or self.duplicated or self.stale:
            self.fail("lost/duplicated/stale items")
        if self.converge_s is None and not any(
            "converge" in f or f.startswith("harness") for f in self.failures
        ):
            self.fail(f"did not converge within {self.deadline_s:.0f}s")
        self.status = "FAIL" if self.failures else "pass"
        return self

    def row(self) -> list[str]:
        if self.status == "skip":
            return [self.name, "skip", "–", "–", "–", "–", "–", "; ".join(self.notes)]
        conv = (
            f"{self.converge_s:.1f}"
            if self.converge_s is not None
            else (f"missed (>{self.deadline_s:.0f})")
        )
        notes = [*self.failures, *self.notes]
        return [
            self.name,
            self.status,
            str(self.files),
            str(self.lost),
            str(self.duplicated),
            str(self.stale),
            conv,
            "; ".join(notes),
        ]


def converge(
    store: Path,
    want: Callable[[], dict[str, str]],
    t0: float,
    deadline: float,
    *,
    extra_ok: bool = False,
) -> float | None:
    """Seconds from t0 until the store matches `want()` (polled every POLL s), or None."""
    target = want()
    while True:
        rows = read_catalog(store)
        now = time.monotonic()
        if rows is not None and store_matches(rows, target, extra_ok):
            return now - t0
        if now - t0 > deadline:
            return None
        time.sleep(max(0.0, POLL - (time.monotonic() - now)))


def quiesce(config: Path, r: Result, expect_failed: int = 0) -> dict[str, Any] | None:
    """After convergence: wait until the ledger shows nothing pending (so late re-sends
    land in the log before counting), bounded by QUIET_WAIT."""
    end = time.monotonic() + QUIET_WAIT
    w = None
    while time.monotonic() < end:
        w = watch_status(config)
        if w is not None and w.get("pending") == 0:
            break
        time.sleep(1.0)
    if w is None:
        r.notes.append("status --json unreadable")
        return None
    r.details["status"] = {k: w.get(k) for k in ("synced", "pending", "failed", "problem")}
    if w.get("pending"):
        r.notes.append(f"status still {w['pending']} pending {QUIET_WAIT:.0f}s after converging")
    if w.get("failed", 0) != expect_failed:
        errs = "; ".join(f"{e.get('item')}: {e.get('error')}" for e in w.get("last_errors", [])[:3])
        r.notes.append(f"status {w.get('failed')} failed ({errs})")
    if w.get("problem"):
        r.notes.append(f"status problem: {w['problem']}")
    return w


def final_items(config: Path, store: Path, r: Result) -> list[tuple[str, int, str | None]]:
    """The store's items through the CLI (`ingestd items --json`); the catalog directly
    when the CLI cannot list them (noted)."""
    out = cli(config, "items", DATASET, "--json", timeout=120)
    if out.returncode == 0:
        try:
            return [
                (i["key"], i["version"], item_digest(i["slots"])) for i in json.loads(out.stdout)
            ]
        except (json.JSONDecodeError, KeyError) as e:
            r.notes.append(f"items --json unreadable ({e}); catalog read directly")
    else:
        r.notes.append(f"items --json exited {out.returncode}; catalog read directly")
    return read_catalog(store) or []


def blob_ok(store: Path, digest: str) -> bool:
    """The store's blob for this digest exists and hashes to it (store/blobs.py layout)."""
    hexd = digest.partition(":")[2]
    path = store / "blobs" / "sha256" / hexd[:2] / hexd
    try:
        return file_digest(path) == digest
    except OSError:
        return False


def evaluate(
    r: Result,
    items: list[tuple[str, int, str | None]],
    truth: dict[str, str],
    history: dict[str, set[str]],
    events: list[dict[str, Any]],
    *,
    store: Path,
    deleted_count_stale: bool,
    ignore_keys: set[str] = frozenset(),  # type: ignore[assignment]
) -> None:
    """Fill lost / duplicated / stale from the final store, the truth and the log."""
    by_key: dict[str, list[tuple[int, str | None]]] = {}
    for k, v, d in items:
        by_key.setdefault(k, []).append((v, d))
    every = set().union(*history.values()) if history else set()
    lost: list[str] = []
    stale: list[str] = []
    for key, want in truth.items():
        got = by_key.get(key)
        if not got:
            lost.append(f"{key}: no item")
            continue
        d = got[0][1]
        if d == want:
            if not blob_ok(store, want):
                lost.append(f"{key}: the store's blob is missing or does not hash to {want}")
            continue
        rel = key[1:]
        if d in history.get(rel, set()) or d in every:
            stale.append(f"{key}: older content")
        else:
            lost.append(f"{key}: content the file never had ({d})")
    for key in sorted(set(by_key) - set(truth) - ignore_keys):
        if deleted_count_stale:
            stale.append(f"{key}: item for a deleted file")
    store_dups = {k: len(v) for k, v in by_key.items() if len(v) > 1}
    # A "synced" line with changed=false is the store recognising content it already
    # held (a put repeated after a kill landed between the store's commit and the
    # ledger's): no second copy and no new version, so not a duplicate. Counted apart.
    sends = Counter(
        (e.get("item"), e.get("version"))
        for e in events
        if e.get("event") == "synced"
        and e.get("item") is not None
        and e.get("changed") is not False
    )
    resends = {f"{k[0]} v{k[1]}": c - 1 for k, c in sends.items() if c > 1}
    unchanged = sum(1 for e in events if e.get("event") == "synced" and e.get("changed") is False)
    if unchanged:
        r.notes.append(f"{unchanged} idempotent re-puts (changed=false: nothing stored again)")
    r.files = len(truth)
    r.lost = len(lost)
    r.stale = len(stale)
    r.duplicated = sum(n - 1 for n in store_dups.values()) + sum(resends.values())
    if store_dups:
        r.notes.append(f"{len(store_dups)} keys with more than one store item")
    if resends:
        r.notes.append(f"{sum(resends.values())} re-sends of an (item, version) already sent")
    r.details.update(
        lost=lost[:50],
        stale=stale[:50],
        store_duplicates=dict(list(store_dups.items())[:50]),
        resends=dict(list(resends.items())[:50]),
        synced_lines=sum(sends.values()),
        store_items=len(items),
    )
    tmp = store / "tmp"
    leftovers = len(os.listdir(tmp)) if tmp.is_dir() else 0
    if leftovers:
        r.notes.append(f"{leftovers} temp files left in the store's tmp/")
    errors = [e for e in events if e.get("level") in ("error", "critical")]
    if errors:
        kinds = Counter(str(e.get("event"))[:60] for e in errors)
        r.notes.append(
            "daemon logged errors: " + ", ".join(f"{k} ×{n}" for k, n in kinds.most_common(3))
        )
        r.details["log_errors"] = dict(kinds)


def stop_and_time(d: Daemon, r: Result) -> None:
    rc, secs = d.term()
    r.details["sigterm_s"] = round(secs, 2)
    if rc is None:
        r.fail(f"SIGTERM did not end the daemon in {TERM_BOUND:.0f}s (killed)")
    elif rc != 0:
        r.notes.append(f"daemon exited {rc} on SIGTERM")


def root_reason(what: str) -> str | None:
    if os.geteuid() != 0:
        return f"needs root ({what}); run as root to include it"
    return None


# --- scenarios -----------------------------------------------------------------------------


@dataclass
class Opts:
    quick: bool
    seed: int
    deadline: float | None

    def dl(self, full: float, quick: float) -> float:
        return self.deadline or (quick if self.quick else full)


def sc_sigkill(ws: Workspace, o: Opts, r: Result) -> None:
    rounds = 3 if o.quick else 10
    preload = 100 if o.quick else 200
    root = ws.fresh("sigkill")
    drop, store, state = root / "drop", root / "store", root / "state"
    drop.mkdir()
    cfg = write_config(root, drop=drop, state=state, store=store)
    rng = random.Random(o.seed)
    wr = Writer(
        drop, random.Random(o.seed + 1), max_files=preload + 150, pace=0.005, big_share=0.05
    )
    for _ in range(preload):
        wr.create()
    d = Daemon(cfg, root / "ingestd.log")
    kills = []
    try:
        d.start()
        wr.start()
        for k in range(rounds):
            time.sleep(rng.uniform(0.4, 2.0))  # the experiment's input: when to kill
            rows = read_catalog(store) or []
            want = wr.expected()
            d.kill()
            have = {key: dg for key, _, dg in rows}
            behind = sum(have.get(key) != dg for key, dg in want.items())
            kills.append({"kill": k, "store_items": len(rows), "files_behind": behind})
            time.sleep(rng.uniform(0.1, 0.6))  # down: the writer goes on
            if k < rounds - 1:
                d.start()
        wr.stop()
        t0 = d.start()
        dl = o.dl(90, 45)
        r.deadline_s = dl
        truth = scan_truth(drop)
        r.converge_s = converge(store, lambda: truth.files, t0, dl)
        quiesce(cfg, r)
        stop_and_time(d, r)
        r.details.update(kills=kills, writer_ops=dict(wr.ops))
        busy = sum(1 for x in kills if x["files_behind"])
        r.notes.append(
            f"{rounds} kills ({busy} with the store behind the folder);"
            f" writer ops {sum(wr.ops.values())}"
        )
        evaluate(
            r,
            final_items(cfg, store, r),
            truth.files,
            wr.history,
            d.events(),
            store=store,
            deleted_count_stale=True,
        )
    finally:
        wr.stop()
        d.kill()


def _set_sysctl(path: str, value: int) -> None:
    with open(path, "w") as fh:
        fh.write(f"{value}\n")


def sc_overflow(ws: Workspace, o: Opts, r: Result) -> None:
    reason = root_reason("lowering /proc/sys/fs/inotify/max_queued_events")
    if reason:
        r.status = "skip"
        r.notes.append(reason)
        return
    burst = 1000 if o.quick else 3000
    knob = "/proc/sys/fs/inotify/max_queued_events"
    root = ws.fresh("overflow")
    drop, store, state = root / "drop", root / "store", root / "state"
    drop.mkdir()
    cfg = write_config(root, drop=drop, state=state, store=store)
    wr = Writer(drop, random.Random(o.seed + 2), folders=2, max_files=10_000, prefix="old")
    for _ in range(100):
        wr.create(via_temp=True)
    try:
        original = int(Path(knob).read_text())
        _set_sysctl(knob, original)  # writable here? (a container may mount /proc/sys ro)
    except (OSError, ValueError) as e:
        r.status = "skip"
        r.notes.append(f"cannot set {knob}: {e}")
        return
    d = Daemon(cfg, root / "ingestd.log")
    try:
        # The kernel sizes an inotify queue when the instance is created: lowered only
        # while the daemon starts and installs its watcher (other processes on this
        # machine creating an inotify instance in this window get the small queue too).
        try:
            _set_sysctl(knob, 64)
            d.start()
            # the first pass runs after the watcher is installed: one synced item proves it
            end = time.monotonic() + 60
            while not read_catalog(store) and time.monotonic() < end:
                time.sleep(0.05)
        finally:
            _set_sysctl(knob, original)
        ok = converge(store, wr.expected, time.monotonic(), 60)
        if ok is None:
            r.notes.append("the 100 files before the burst did not sync within 60s")
        # the burst: new folders, as fast as possible, with overwrites and deletes of the
        # older files mixed in (their events are the ones a lost queue hides)
        rng = random.Random(o.seed + 3)
        t_burst = time.monotonic()
        for i in range(burst):
            folder = f"burst{i % 10}"
            if i < 10:
                (drop / folder).mkdir()
            data = f"burst {i}\n".encode() + rng.randbytes(rng.randint(100, 1500))
            (drop / folder / f"b{i:05d}.bin").write_bytes(data)
            wr.current[f"{folder}/b{i:05d}.bin"] = digest_of(data)
            wr.history.setdefault(f"{folder}/b{i:05d}.bin", set()).add(digest_of(data))
            if i % 50 == 25:
                wr.overwrite_atomic()
            if i % 100 == 75:
                wr.delete()
        t0 = time.monotonic()
        r.details["burst_s"] = round(t0 - t_burst, 2)
        dl = o.dl(120, 60)
        r.deadline_s = dl
        truth = scan_truth(drop)
        r.converge_s = converge(store, lambda: truth.files, t0, dl)
        overflows = read_metric(state, "ingestd_inotify_overflows_total")
        r.details["overflows"] = overflows
        if overflows is None:
            r.notes.append("overflow count unreadable (/metrics)")
        elif overflows == 0:
            r.notes.append("no inotify overflow happened: the fault was not injected")
        else:
            r.notes.append(
                f"{overflows:.0f} inotify overflows; burst {burst} files in {r.details['burst_s']}s"
            )
        quiesce(cfg, r)
        stop_and_time(d, r)
        evaluate(
            r,
            final_items(cfg, store, r),
            truth.files,
            wr.history,
            d.events(),
            store=store,
            deleted_count_stale=True,
        )
    finally:
        if int(Path(knob).read_text()) != original:
            _set_sysctl(knob, original)
        d.kill()


def read_metric(state: Path, name: str) -> float | None:
    """A metric of the running daemon from its control endpoint (state_dir/control.addr)."""
    try:
        addr = (state / "control.addr").read_text().strip()
        url = addr if addr.startswith("http") else f"http://{addr}"
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except (OSError, ValueError):
        return None
    total = None
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            with contextlib.suppress(ValueError):
                total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total


def sc_backend_restart(ws: Workspace, o: Opts, r: Result) -> None:
    kills = 2 if o.quick else 4
    root = ws.fresh("backend")
    drop, state = root / "drop", root / "state"
    drop.mkdir()
    server = Server(root, "soak-token-" + os.urandom(8).hex())
    cfg = write_config(root, drop=drop, state=state, http=(server.url, server.tokens))
    rng = random.Random(o.seed + 4)
    wr = Writer(
        drop,
        random.Random(o.seed + 5),
        max_files=200,
        pace=0.03,
        weights={"create": 50, "overwrite_atomic": 25, "rename_over": 5, "delete": 10},
    )
    for _ in range(60):
        wr.create()
    d = Daemon(cfg, root / "ingestd.log")
    downs = []
    try:
        server.start()
        d.start()
        wr.start()
        t0 = time.monotonic()
        for k in range(kills):
            time.sleep(rng.uniform(1.0, 2.5))
            server.kill()
            down = rng.uniform(0.5, 2.0)
            time.sleep(down)
            if k == kills - 1:
                wr.stop()
            server.start()
            t0 = time.monotonic()
            downs.append(round(down, 2))
            if d.check() is not None:
                r.fail(f"daemon exited {d.exits[-1]} while the server was down")
                d.start()
        dl = o.dl(90, 45)
        r.deadline_s = dl
        truth = scan_truth(drop)
        r.converge_s = converge(server.store, lambda: truth.files, t0, dl)
        quiesce(cfg, r)
        stop_and_time(d, r)
        items = final_items(cfg, server.store, r)
        r.details.update(server_down_s=downs, writer_ops=dict(wr.ops))
        r.notes.append(f"{kills} server kills, down {', '.join(map(str, downs))} s")
        evaluate(
            r,
            items,
            truth.files,
            wr.history,
            d.events(),
            store=server.store,
            deleted_count_stale=True,
        )
    finally:
        wr.stop()
        d.kill()
        server.stop()


class Tmpfs:
    """An 8 MiB tmpfs (root), unmounted on exit, with a filler that keeps it full."""

    def __init__(self, mountpoint: Path, size: str = "8m") -> None:
        self.mnt = mountpoint
        self.size = size
        self.mounted = False
        self._halt = threading.Event()
        self._filler: threading.Thread | None = None
        self.fill_bytes = 0

    def mount(self) -> str | None:
        self.mnt.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.mnt)],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            return f"mount -t tmpfs failed: {out.stderr.strip() or out.returncode}"
        self.mounted = True
        return None

    def _top_up(self) -> None:
        chunk = b"\0" * (64 << 10)
        with open(self.mnt / "filler", "ab", buffering=0) as fh:
            while not self._halt.is_set():
                try:
                    while True:  # until ENOSPC, then small writes until not even a byte fits
                        self.fill_bytes += fh.write(chunk)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                try:
                    while True:
                        self.fill_bytes += fh.write(b"\0" * 512)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                self._halt.wait(0.1)  # whatever the daemon frees, take again

    def fill(self) -> None:
        self._halt.clear()
        self._filler = threading.Thread(target=self._top_up, daemon=True, name="soak-filler")
        self._filler.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # wait until it is full
            if os.statvfs(self.mnt).f_bavail == 0:
                return
            time.sleep(0.02)

    def free(self) -> None:
        self._halt.set()
        if self._filler is not None:
            self._filler.join(timeout=10)
        (self.mnt / "filler").unlink(missing_ok=True)

    def unmount(self) -> None:
        self.free()
        if self.mounted:
            out = subprocess.run(["umount", str(self.mnt)], capture_output=True, text=True)
            if out.returncode != 0:
                subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
            self.mounted = False


def sc_disk_full(ws: Workspace, o: Opts, r: Result, where: str) -> None:
    reason = root_reason("mount -t tmpfs")
    if reason:
        r.status = "skip"
        r.notes.append(reason)
        return
    root = ws.fresh(f"diskfull-{where}")
    drop = root / "drop"
    drop.mkdir()
    fs = Tmpfs(root / "tmpfs")
    why = fs.mount()
    if why:
        r.status = "skip"
        r.notes.append(why)
        return
    store = (fs.mnt if where == "store" else root) / "store"
    state = (fs.mnt if where == "state" else root) / "state"
    cfg = write_config(root, drop=drop, state=state, store=store)
    fault_s = 4.0 if o.quick else 8.0
    wr = Writer(
        drop,
        random.Random(o.seed + (6 if where == "store" else 7)),
        max_files=400,
        pace=0.05,
        sizes=(2_000, 20_000),
        weights={"create": 70, "overwrite_atomic": 20, "delete": 10},
    )
    for _ in range(20 if o.quick else 40):
        wr.create()
    d = Daemon(cfg, root / "ingestd.log")
    try:
        d.start()
        pre = converge(store, wr.expected, time.monotonic(), 60)
        if pre is None:
            r.notes.append("the files before the fault did not sync within 60s")
        fs.fill()
        r.details["filler_bytes"] = fs.fill_bytes
        wr.start()
        t_fault = time.monotonic()
        while time.monotonic() - t_fault < fault_s:
            if d.check() is not None:
                r.fail(f"daemon exited {d.exits[-1]} on the full disk")
            time.sleep(0.2)
        wr.stop()
        during = read_catalog(store)
        r.details["store_items_while_full"] = None if during is None else len(during)
        fs.free()
        t0 = time.monotonic()
        if d.check() is not None or not d.alive():
            if not any("exited" in f for f in r.failures):
                r.fail(f"daemon exited {d.exits[-1] if d.exits else '?'} on the full disk")
            r.notes.append("restarted after freeing (as systemd's Restart=on-failure would)")
            try:
                d.start()
            except DaemonExited as e:
                r.fail(str(e))
        dl = o.dl(120, 60)
        r.deadline_s = dl
        truth = scan_truth(drop)
        r.converge_s = converge(store, lambda: truth.files, t0, dl)
        if d.check() is not None:
            r.fail(f"daemon exited {d.exits[-1]} after the disk was freed")
        r.notes.append(
            f"{where} on an 8 MiB tmpfs, full for {fault_s:.0f}s while"
            f" {wr.ops['create']} files were created"
        )
        if d.alive():
            quiesce(cfg, r)
            stop_and_time(d, r)
        evaluate(
            r,
            final_items(cfg, store, r),
            truth.files,
            wr.history,
            d.events(),
            store=store,
            deleted_count_stale=True,
        )
    finally:
        wr.stop()
        d.kill()
        fs.unmount()


def _tiny_jpeg() -> bytes:
    try:
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "JPEG")
        return buf.getvalue()
    except ImportError:
        return b""


def sc_bad_names(ws: Workspace, o: Opts, r: Result) -> None:
    root = ws.fresh("badnames")
    drop, store, state = root / "drop", root / "store", root / "state"
    drop.mkdir()
    cfg = write_config(
        root,
        drop=drop,
        state=state,
        store=store,
        on_delete="keep",
        metadata={"sidecar": "{name}.json"},
    )
    rng = random.Random(o.seed + 8)
    bdrop = os.fsencode(drop)
    jpeg = _tiny_jpeg()
    history: dict[str, set[str]] = {}
    # bad entries: display key -> (needles to find it in the failure listing, may it sync?)
    bad: dict[str, tuple[list[str], bool]] = {}

    def normal(rel: str, sidecar: bool = False) -> None:
        data = f"normal {rel}\n".encode() + rng.randbytes(rng.randint(100, 3000))
        (drop / rel).parent.mkdir(parents=True, exist_ok=True)
        (drop / rel).write_bytes(data)
        history.setdefault(rel, set()).add(digest_of(data))
        if sidecar:
            (drop / (rel + ".json")).write_text(json.dumps({"soak": rel}))

    def raw_file(rel: bytes, data: bytes) -> None:
        p = os.path.join(bdrop, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as fh:
            fh.write(data)
        key = display_key(rel)
        # the %XX form, or the name as JSON writes a surrogate-escaped str
        bad[key] = ([key[1:], json.dumps(os.fsdecode(rel))[1:-1]], True)

    def fifo(rel: str) -> None:
        os.mkfifo(drop / rel)
        bad["/" + rel] = ([rel], False)

    def fifo_sidecar(rel: str) -> None:
        normal(rel)
        os.mkfifo(drop / (rel + ".json"))
        bad["/" + rel] = ([rel], False)
        history.pop(rel, None)  # expected to fail, not to sync

    def make(tag: str) -> None:
        for i in range(10):
            normal(f"{tag}{i:02d}.bin", sidecar=i < 3)
        normal(f"sub{tag}/{tag}x.bin")
        raw_file(f"caf\xe9{tag}.jpg".encode("latin-1"), jpeg or b"not an image")
        raw_file(f"d\xff{tag}/x.bin".encode("latin-1"), f"in d\\xff {tag}".encode())
        fifo(f"pipe{tag}.mp4")
        fifo_sidecar(f"withfifo{tag}.bin")
        long = "L" * (251 - len(tag) - 4) + tag + ".bin"  # 251 bytes: +.json is 256
        normal(long)

    make("a")  # before the daemon starts: the first pass finds them
    d = Daemon(cfg, root / "ingestd.log")
    try:
        d.start()
        time.sleep(1.0)
        t_fault = time.monotonic()
        make("b")  # while it runs: the events path
        t0 = time.monotonic()
        r.details["make_s"] = round(t0 - t_fault, 2)
        want = {"/" + rel: next(iter(ds)) for rel, ds in history.items()}
        dl = o.dl(60, 30)
        r.deadline_s = dl
        r.converge_s = converge(store, lambda: want, t0, dl, extra_ok=True)
        if d.check() is not None:
            r.fail(f"daemon exited {d.exits[-1]}")
        time.sleep(1.0)  # let the bad ones' failures be recorded
        # the failure listing: `status --failed` where it exists, else status --json
        help_text = cli(cfg, "status", "--help").stdout
        listing = ""
        if "--failed" in help_text:
            out = cli(cfg, "status", "--failed")
            listing += out.stdout + out.stderr
            outj = cli(cfg, "status", "--failed", "--json")
            listing += outj.stdout
            r.details["failed_listing"] = "status --failed"
        else:
            r.notes.append("status --failed not there yet: status --json last_errors used")
            r.details["failed_listing"] = "status --json"
        sj = status_json(cfg)
        listing += json.dumps(sj, ensure_ascii=False) if sj else ""
        rows = read_catalog(store) or []
        synced = {k: dg for k, _, dg in rows}
        truth = scan_truth(drop, sidecars=True)
        outcome: dict[str, str] = {}
        reasons: dict[str, str] = {}
        for key, (needles, may_sync) in bad.items():
            if may_sync and key in synced:
                ok = synced[key] == truth.raw.get(key)
                outcome[key] = "synced" if ok else "synced with wrong content"
                if not ok:
                    r.lost += 1
            elif any(n and n in listing for n in needles):
                outcome[key] = "listed as failed"
                reasons[key] = failure_reason(listing, sj, needles)
            else:
                outcome[key] = "unreported"
        r.details["bad_entries"] = outcome
        r.details["failure_reasons"] = reasons
        if any(not v for v in reasons.values()):
            r.notes.append("a failed bad entry is listed without a reason")
        unreported = [k for k, v in outcome.items() if v == "unreported"]
        if unreported:
            r.fail(
                f"{len(unreported)} bad entries neither synced nor listed: "
                + ", ".join(unreported[:4])
            )
        c = Counter(outcome.values())
        r.notes.append("bad entries: " + ", ".join(f"{v} {k}" for k, v in sorted(c.items())))
        stop_and_time(d, r)
        r.notes.append(f"SIGTERM took {r.details.get('sigterm_s')}s")
        lost_before = r.lost
        evaluate(
            r,
            final_items(cfg, store, r),
            want,
            history,
            d.events(),
            store=store,
            deleted_count_stale=False,
            ignore_keys=set(bad),
        )
        r.lost += lost_before
    finally:
        d.kill()


def failure_reason(listing: str, status: dict[str, Any] | None, needles: list[str]) -> str:
    """The reason shown for a failed entry: from status --json last_errors, else the
    first line of the listing that names it."""
    for w in (status or {}).get("watches", []):
        for e in w.get("last_errors", []):
            if any(n and n in str(e.get("item")) for n in needles):
                return str(e.get("error") or "")[:200]
    for line in listing.splitlines():
        if any(n and n in line for n in needles):
            return line.strip()[:200]
    return ""


RUNNERS: dict[str, Callable[[Workspace, Opts, Result], None]] = {
    "sigkill": sc_sigkill,
    "overflow": sc_overflow,
    "backend_restart": sc_backend_restart,
    "disk_full_store": lambda ws, o, r: sc_disk_full(ws, o, r, "store"),
    "disk_full_state": lambda ws, o, r: sc_disk_full(ws, o, r, "state"),
    "bad_names": sc_bad_names,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and files (~2 min)")
    ap.add_argument("--only", action="append", default=[], help="scenario(s), comma-separated")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    ap.add_argument("--seed", type=int, default=int(os.environ.get("INGESTD_SOAK_SEED", "14")))
    ap.add_argument("--deadline", type=float, help="convergence deadline, seconds (all)")
    args = ap.parse_args()
    only = [s for a in args.only for s in a.split(",") if s]
    unknown = [s for s in only if s not in RUNNERS]
    if unknown:
        ap.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    chosen = only or SCENARIOS
    o = Opts(args.quick, args.seed, args.deadline)
    info = machine()
    say(f"seed {o.seed}, {'quick' if o.quick else 'full'}, scenarios: {', '.join(chosen)}")
    results: list[Result] = []
    started = time.monotonic()
    with Workspace("soak") as ws:
        for name in chosen:
            r = Result(name)
            t = time.monotonic()
            say(f"{name} ...")
            try:
                RUNNERS[name](ws, o, r)
            except Exception as e:  # a scenario's crash is its result
                r.fail(f"harness: {type(e).__name__}: {e}")
                r.details["traceback"] = traceback.format_exc()
                say(r.details["traceback"])
            r.finish()
            r.details["wall_s"] = round(time.monotonic() - t, 1)
            results.append(r)
            say(f"{name}: {' | '.join(r.row()[1:])} ({r.details['wall_s']}s)")
    total = time.monotonic() - started
    headers = ["scenario", "result", "files", "lost", "duplicated", "stale", "converge s", "notes"]
    print()
    print(
        f"`.venv/bin/python bench/soak.py{' --quick' if o.quick else ''}"
        f"{' --only ' + ','.join(only) if only else ''}` (seed {o.seed}, {total:.0f}s)"
    )
    print()
    print(table(headers, [r.row() for r in results]))
    print()
    print("\n".join(f"- {k}: {v}" for k, v in info.items()))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "command": sys.argv,
                    "seed": o.seed,
                    "quick": o.quick,
                    "seconds": round(total, 1),
                    "machine": info,
                    "results": [r.__dict__ for r in results],
                },
                indent=2,
                default=str,
            )
        )
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
