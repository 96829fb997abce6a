"""Process plumbing: signal handling, and systemd's notify protocol (readiness, status
line, reload/stop states, watchdog pings). The pid file (one daemon per state dir) is
ingestd.core.pidfile, re-exported here for the runtime and the CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping

import structlog

from ingestd.core.pidfile import PID_FILE, AlreadyRunning, PidLock, running_pid

__all__ = [
    "PID_FILE",
    "AlreadyRunning",
    "Notifier",
    "PidLock",
    "install_signals",
    "running_pid",
    "watchdog_loop",
]

log = structlog.get_logger("ingestd")


def install_signals(
    loop: asyncio.AbstractEventLoop,
    on_stop: Callable[[], None],
    on_rescan: Callable[[], None],
    on_reload: Callable[[], None] | None = None,
) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    # SIGUSR1: `ingestd retry` asks the running daemon to look at its folders again now.
    loop.add_signal_handler(signal.SIGUSR1, on_rescan)
    if on_reload is not None:
        # SIGHUP: `systemctl reload`, `ingestd reload`: re-read the config file.
        loop.add_signal_handler(signal.SIGHUP, on_reload)


# -- systemd notify protocol --------------------------------------------------------------


class Notifier:
    """systemd's notify protocol (sd_notify(3)) spoken directly: each message is one
    datagram of `KEY=VALUE` lines sent to the AF_UNIX socket named by $NOTIFY_SOCKET (a
    path, or `@name` for the abstract namespace). Without NOTIFY_SOCKET, i.e. outside a
    `Type=notify` unit, every method does nothing.

    Sending never raises: the daemon's work matters more than systemd hearing about it.
    The first failure is logged as a warning, later ones at debug level."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.socket_path = env.get("NOTIFY_SOCKET") or None
        self._address: bytes | None = None
        self._problem: str | None = None
        if self.socket_path is not None:
            if self.socket_path.startswith("@"):
                self._address = b"\0" + self.socket_path[1:].encode()
            elif self.socket_path.startswith("/"):
                self._address = self.socket_path.encode()
            else:  # e.g. systemd >= 254's vsock: addresses, for VMs; not ours to serve
                self._problem = f"unsupported NOTIFY_SOCKET address {self.socket_path!r}"
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        """Whether messages go anywhere (NOTIFY_SOCKET is set to an address we can use)."""
        return self._address is not None

    def ready(self) -> None:
        """READY=1: startup finished (the first scans are under way), or a reload ended."""
        self.notify("READY=1")

    def status(self, text: str) -> None:
        """STATUS=<text>: the one line `systemctl status` shows."""
        self.notify("STATUS=" + " ".join(text.splitlines()))

    def reloading(self) -> None:
        """RELOADING=1 with MONOTONIC_USEC=<CLOCK_MONOTONIC now, µs>, as systemd >= 253
        expects for reload semantics; send ready() when the reload is done."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={now_usec}")

    def stopping(self) -> None:
        """STOPPING=1: shutdown has begun."""
        self.notify("STOPPING=1")

    def watchdog(self) -> None:
        """WATCHDOG=1: one keep-alive ping."""
        self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings: half of WATCHDOG_USEC, or None when systemd
        expects no pings from this process (no NOTIFY_SOCKET, WATCHDOG_USEC unset or not
        a positive integer, or WATCHDOG_PID naming another process)."""
        if not self.enabled or not self._watchdog_usec:
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        return usec / 2 / 1_000_000

    def notify(self, *fields: str) -> bool:
        """Send one message made of `fields` (KEY=VALUE each). True when it was sent."""
        if self._address is None:
            if self._problem is not None:
                self._warn_once(self._problem)
            return False
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never stall the event loop on a full receive queue: a lost status line
                # is better than a blocked daemon (and then a watchdog restart).
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto("\n".join(fields).encode(), self._address)
            return True
        except OSError as e:
            self._warn_once(f"cannot notify systemd at {self.socket_path}: {e}")
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _warn_once(self, message: str) -> None:
        if self._warned:
            log.debug("systemd notify failed", error=message)
            return
        self._warned = True
        log.warning("systemd notify failed; the daemon goes on without it", error=message)


async def watchdog_loop(notifier: Notifier, healthy: Callable[[], bool]) -> None:
    """Ping systemd's watchdog every `notifier.watchdog_interval()` seconds while
    `healthy()` is true. The pings come from the event loop itself, so a wedged loop stops
    them and systemd restarts the service after WatchdogSec=; an unhealthy daemon stops
    them on purpose (and resumes if it recovers in time). Returns at once when systemd
    expects no pings."""
    interval = notifier.watchdog_interval()
    if interval is None:
        return
    was_healthy = True
    while True:
        try:
            ok = bool(healthy())
        except Exception as e:  # a broken health check counts as unhealthy
            log.warning("health check failed", error=repr(e))
            ok = False
        if ok:
            notifier.watchdog()
        elif was_healthy:
            log.warning("daemon unhealthy: watchdog pings stop until it recovers")
        was_healthy = ok
        await asyncio.sleep(interval)
