"""The systemd notify protocol, with the test playing systemd's side: a datagram socket
that receives what ingestd.runtime.service.Notifier sends, exactly as systemd's notify socket does
(including the sender credentials systemd uses for NotifyAccess=main)."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from ingestd.runtime.service import Notifier, watchdog_loop


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # systemd turns this on so the kernel tells it which pid sent each message.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(10)

    def recv(self) -> list[str]:
        """The next message, as its lines."""
        return self.recv_with_pid()[0]

    def recv_with_pid(self) -> tuple[list[str], int | None]:
        data, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = None
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = struct.unpack("iII", payload[:12])
        return data.decode().split("\n"), pid

    def pending(self) -> list[list[str]]:
        """Every message already queued, without waiting."""
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    out.append(self.sock.recv(4096).decode().split("\n"))
                except BlockingIOError:
                    return out
        finally:
            self.sock.settimeout(10)

    async def arecv(self, timeout: float = 10) -> list[str]:
        loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        try:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), timeout)
        finally:
            self.sock.settimeout(10)
        return data.decode().split("\n")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[tuple[FakeSystemd, str]]:
    path = str(tmp_path / "notify.sock")
    fake = FakeSystemd(path)
    yield fake, path
    fake.close()


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_each_message_reaches_systemd_in_order(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    n.ready()
    n.status("3 watches, 12 pending, 0 failed")
    n.watchdog()
    before = monotonic_usec()
    n.reloading()
    after = monotonic_usec()
    n.ready()
    n.stopping()
    assert fake.recv() == ["READY=1"]
    assert fake.recv() == ["STATUS=3 watches, 12 pending, 0 failed"]
    assert fake.recv() == ["WATCHDOG=1"]
    reloading = fake.recv()
    assert reloading[0] == "RELOADING=1"
    key, _, value = reloading[1].partition("=")
    assert key == "MONOTONIC_USEC" and len(reloading) == 2
    # CLOCK_MONOTONIC microseconds taken when the reload began, as systemd compares them.
    assert before <= int(value) <= after
    assert fake.recv() == ["READY=1"]
    assert fake.recv() == ["STOPPING=1"]
    assert fake.pending() == []
    n.close()


def test_systemd_sees_the_sender_pid(systemd: tuple[FakeSystemd, str]) -> None:
    """NotifyAccess=main: systemd accepts a message only from the main pid, which it
    learns from the kernel's credentials on the datagram."""
    fake, path = systemd
    n = Notifier({"NOTIFY_SOCKET": path})
    n.ready()
    lines, pid = fake.recv_with_pid()
    assert lines == ["READY=1"]
    assert pid == os.getpid()


def test_status_stays_one_line(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    Notifier({"NOTIFY_SOCKET": path}).status("1 watches,\n2 pending")
    assert fake.recv() == ["STATUS=1 watches, 2 pending"]


def test_abstract_namespace_socket() -> None:
    name = f"ingestd-test-{uuid.uuid4().hex}"
    fake = FakeSystemd(b"\0" + name.encode())
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.enabled
        n.ready()
        n.status("0 watches, 0 pending, 0 failed")
        assert fake.recv() == ["READY=1"]
        assert fake.recv() == ["STATUS=0 watches, 0 pending, 0 failed"]
    finally:
        fake.close()


def test_reads_the_process_environment(
    systemd: tuple[FakeSystemd, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, path = systemd
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    n = Notifier()
    n.ready()
    assert fake.recv() == ["READY=1"]
    assert n.watchdog_interval() == 2.0


def test_no_op_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    n = Notifier()
    assert not n.enabled
    with structlog.testing.capture_logs() as logs:
        n.ready()
        n.status("1 watches, 0 pending, 0 failed")
        n.reloading()
        n.watchdog()
        n.stopping()
        assert n.notify("READY=1") is False
    assert logs == []  # nothing to complain about: there is simply no systemd
    assert n.watchdog_interval() is None  # no one to ping


def test_an_empty_notify_socket_is_unset() -> None:
    n = Notifier({"NOTIFY_SOCKET": ""})
    assert not n.enabled
    assert n.notify("READY=1") is False


def test_a_failing_send_never_raises_and_warns_once(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    assert n.enabled
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            assert n.notify("READY=1") is False
            n.ready()
            n.watchdog()
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert "nobody-listens.sock" in warnings[0]["error"]


def test_a_receiver_that_goes_away_never_raises(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.notify("READY=1") is True
    fake.close()
    os.unlink(path)
    with structlog.testing.capture_logs() as logs:
        assert n.notify("STOPPING=1") is False
    assert [e["log_level"] for e in logs] == ["warning"]


@pytest.mark.parametrize("address", ["notify.sock", "vsock:2:1234"])
def test_an_unusable_address_never_raises_and_warns_once(address: str) -> None:
    n = Notifier({"NOTIFY_SOCKET": address})
    assert not n.enabled
    with structlog.testing.capture_logs() as logs:
        n.ready()
        n.stopping()
    assert [e["log_level"] for e in logs] == ["warning", "debug"]
    assert address in logs[0]["error"]


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("1000000", None, 0.5),
        ("30000000", None, 15.0),
        ("1000000", "self", 0.5),
        ("1000000", "other", None),
        ("1000000", "nonsense", None),
        (None, None, None),
        ("", None, None),
        ("0", None, None),
        ("-1000000", None, None),
        ("30s", None, None),
    ],
)
def test_watchdog_interval(
    systemd: tuple[FakeSystemd, str], usec: str | None, pid: str | None, expected: float | None
) -> None:
    _, path = systemd
    env = {"NOTIFY_SOCKET": path}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    if pid == "self":
        env["WATCHDOG_PID"] = str(os.getpid())
    elif pid == "other":
        env["WATCHDOG_PID"] = str(os.getppid())  # e.g. a child inherited the variables
    elif pid is not None:
        env["WATCHDOG_PID"] = pid
    assert Notifier(env).watchdog_interval() == expected


async def test_watchdog_loop_pings_while_healthy(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})  # ping every 50 ms
    state = {"healthy": True, "calls": 0}
    checks: list[float] = []

    def healthy() -> bool:
        state["calls"] += 1
        checks.append(time.monotonic())
        return bool(state["healthy"])

    task = asyncio.create_task(watchdog_loop(n, healthy))
    try:
        for _ in range(4):
            assert await fake.arecv() == ["WATCHDOG=1"]
        # One check (and ping) per interval, never faster (a busy machine may be slower).
        gaps = [b - a for a, b in itertools.pairwise(checks)]
        assert min(gaps) >= 0.049, gaps

        # Unhealthy: pings stop. A ping from a healthy check is sent in the same loop step
        # as that check, so whatever is queued now came before the flip.
        state["healthy"] = False
        fake.pending()
        calls = state["calls"]
        while state["calls"] < calls + 3:
            await asyncio.sleep(0.01)
        assert fake.pending() == []
        assert not task.done()

        # Recovered before systemd gave up: pings resume.
        state["healthy"] = True
        assert await fake.arecv() == ["WATCHDOG=1"]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watchdog_loop_treats_a_failing_health_check_as_unhealthy(
    systemd: tuple[FakeSystemd, str],
) -> None:
    fake, path = systemd
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    calls = 0

    def broken() -> bool:
        nonlocal calls
        calls += 1
        raise RuntimeError("ledger unreachable")

    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(watchdog_loop(n, broken))
        try:
            while calls < 3:
                await asyncio.sleep(0.01)
            assert fake.pending() == []
            assert not task.done()
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert any("ledger unreachable" in str(e.get("error")) for e in logs)


@pytest.mark.parametrize(
    "env",
    [
        {},  # outside systemd
        {"NOTIFY_SOCKET": "/run/systemd/notify"},  # Type=notify without WatchdogSec=
        {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"},
    ],
)
async def test_watchdog_loop_returns_when_no_pings_are_expected(env: dict[str, str]) -> None:
    called = False

    def healthy() -> bool:
        nonlocal called
        called = True
        return True

    await asyncio.wait_for(watchdog_loop(Notifier(env), healthy), timeout=10)
    assert not called
