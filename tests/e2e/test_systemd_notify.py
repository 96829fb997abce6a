"""The daemon speaks systemd's notify protocol: the test plays systemd's side of
NOTIFY_SOCKET (a datagram socket) with the daemon run as a subprocess, as a `Type=notify`
unit with `WatchdogSec=1s` would run it, and expects, in order: READY=1 once the first
scans are under way, a STATUS= line ("1 watches, 0 pending, 0 failed"), WATCHDOG=1 pings,
RELOADING=1 then READY=1 around a reload, and STOPPING=1 on SIGTERM. Every message must
come from the daemon's main pid (NotifyAccess=main)."""

from __future__ import annotations

import itertools
import re
import signal
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.daemon import Env
from tests.support.wait import wait_for

# Not in Python's socket module: the kernel stamps each datagram with its arrival time
# (struct timespec, CLOCK_REALTIME), so ping gaps do not depend on when the test reads.
SO_TIMESTAMPNS = 35
STATUS_LINE = re.compile(r"STATUS=(\d+) watches, (\d+) pending, (\d+) failed")
WATCHDOG_USEC = 1_000_000  # the daemon pings every 0.5 s


@dataclass
class Message:
    lines: list[str]
    pid: int | None
    arrived_ns: int  # the kernel's receive time (or the read time without a stamp)


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: keeps every message with its sender's pid."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[Message] = []

    def poll(self) -> list[Message]:
        while True:
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(
                    4096, socket.CMSG_SPACE(12) + socket.CMSG_SPACE(16)
                )
            except BlockingIOError:
                return self.messages
            pid, arrived = None, time.time_ns()
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
                elif level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", payload[:16])
                    arrived = sec * 1_000_000_000 + nsec
            self.messages.append(Message(data.decode().split("\n"), pid, arrived))

    def index(self, first_line: str | re.Pattern[str], after: int = -1) -> int | None:
        """Index of the first message after `after` whose first line is (or matches) this."""
        for i, m in enumerate(self.poll()):
            if i <= after:
                continue
            line = m.lines[0]
            if line == first_line if isinstance(first_line, str) else first_line.fullmatch(line):
                return i
        return None

    def wait(self, first_line: str | re.Pattern[str], after: int = -1, what: str = "") -> int:
        pattern = first_line if isinstance(first_line, str) else first_line.pattern

        def found() -> tuple[int] | None:  # a tuple: index 0 must count as found
            i = self.index(first_line, after)
            return None if i is None else (i,)

        try:
            return wait_for(found, 60, interval=0.05, what=what or f"{pattern} after #{after}")[0]
        except AssertionError as e:
            raise AssertionError(f"{e}\nmessages so far: {self.summary()}") from None

    def count(self, first_line: str, start: int = 0, end: int | None = None) -> int:
        return sum(1 for m in self.poll()[start:end] if m.lines[0] == first_line)

    def summary(self) -> list[str]:
        return ["|".join(m.lines) for m in self.messages]

    def close(self) -> None:
        self.sock.close()


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


@pytest.fixture
def systemd(env: Env) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(env.root / "notify.sock")
    yield fake
    fake.close()


def start_under_systemd(env: Env, fake: FakeSystemd) -> None:
    env.start(
        extra_env={
            "NOTIFY_SOCKET": str(fake.path),
            "WATCHDOG_USEC": str(WATCHDOG_USEC),
        }
    )


def test_ready_status_watchdog_reload_stop_in_order(env: Env, systemd: FakeSystemd) -> None:
    drop = env.drop()
    env.write_config([{"name": "w", "source": str(drop), "dataset": "ds"}])
    start_under_systemd(env, systemd)
    assert env.daemon is not None

    ready = systemd.wait("READY=1", what="READY=1 once the first scans started")
    status = systemd.wait(STATUS_LINE, after=ready)
    assert systemd.messages[status].lines == ["STATUS=1 watches, 0 pending, 0 failed"]
    ping = systemd.wait("WATCHDOG=1", after=status)
    systemd.wait("WATCHDOG=1", after=ping, what="a second watchdog ping")

    # Pings keep coming at about WATCHDOG_USEC/2: a slow machine may stretch them, but
    # never past WatchdogSec itself, or systemd would kill the daemon.
    wait_for(lambda: systemd.count("WATCHDOG=1") >= 5, what="five watchdog pings")
    pings = [m.arrived_ns for m in systemd.messages if m.lines == ["WATCHDOG=1"]]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < WATCHDOG_USEC * 1000, gaps

    # systemctl reload = SIGHUP: RELOADING=1 (with the time it began) then READY=1.
    before_hup = len(systemd.poll())
    assert systemd.count("RELOADING=1") == 0
    hup_usec = monotonic_usec()
    env.daemon.send_signal(signal.SIGHUP)
    reloading = systemd.wait("RELOADING=1", after=before_hup - 1)
    lines = systemd.messages[reloading].lines
    assert len(lines) == 2 and lines[1].startswith("MONOTONIC_USEC="), lines
    assert hup_usec <= int(lines[1].removeprefix("MONOTONIC_USEC=")) <= monotonic_usec()
    reloaded = systemd.wait("READY=1", after=reloading, what="READY=1 after the reload")
    systemd.wait("WATCHDOG=1", after=reloaded, what="watchdog pings after the reload")

    assert env.stop() == 0
    stopping = systemd.wait("STOPPING=1", after=reloaded)
    assert systemd.count("RELOADING=1") == 1
    assert systemd.count("READY=1", start=stopping) == 0
    # NotifyAccess=main: systemd drops messages from any other pid.
    assert {m.pid for m in systemd.messages} == {env.daemon.pid}, systemd.summary()


def test_status_follows_reloads_and_failures(env: Env, systemd: FakeSystemd) -> None:
    drop = env.drop()
    other = env.drop("other")
    env.write_config([{"name": "w", "source": str(drop), "dataset": "ds"}])
    start_under_systemd(env, systemd)
    ready = systemd.wait("READY=1")
    systemd.wait("STATUS=1 watches, 0 pending, 0 failed", after=ready)

    # An edit of the config file is a reload too, announced the same way, and the status
    # line counts the new watch.
    env.write_config(
        [
            {"name": "w", "source": str(drop), "dataset": "ds"},
            {
                "name": "o",
                "source": str(other),
                "dataset": "ds",
                "path": "/o",
                "metadata": {"sidecar": "{name}.json"},
            },
        ]
    )
    reloading = systemd.wait("RELOADING=1", what="RELOADING=1 after the config edit")
    reloaded = systemd.wait("READY=1", after=reloading)
    systemd.wait("STATUS=2 watches, 0 pending, 0 failed", after=reloaded)

    # An item that fails (its sidecar is not JSON) shows in the status line.
    (other / "bad.dat.json").write_bytes(b'{"label": "cat",,}')
    (other / "bad.dat").write_bytes(b"bad")
    (drop / "good.dat").write_bytes(b"good")
    systemd.wait("STATUS=2 watches, 0 pending, 1 failed", after=reloaded)
    assert env.items_by_key().keys() == {"/good.dat"}
    assert env.stop() == 0
    assert systemd.index("STOPPING=1") is not None
