"""Where the control endpoint listens (`status.listen`), how local tools find it
(`state_dir/control.addr`), and which Host headers it answers."""

from __future__ import annotations

import contextlib
import ipaddress
import os
from pathlib import Path

ADDR_FILE = "control.addr"


def parse_listen(listen: str) -> tuple[str, int] | str:
    """(host, port) for HOST:PORT, or the socket path for unix:PATH."""
    if listen.startswith("unix:"):
        return listen[len("unix:") :]
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def local_host_allowed(name: str, names: set[str]) -> bool:
    """Whether a request's Host (its name, without port) is this machine, on a loopback
    listener: a page on another site that rebinds its DNS name to 127.0.0.1 sends its
    own name, and is refused."""
    return name in names or name.endswith(".localhost") or is_ip(name)


def _connectable(host: str) -> str:
    """A host a local client can connect to for a bound address (not the wildcard)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def address_url(host: str, port: int) -> str:
    host = _connectable(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def write_addr(state_dir: Path, address: str) -> None:
    """Write control.addr atomically: a reader never sees half an address."""
    path = state_dir / ADDR_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(address + "\n")
    os.replace(tmp, path)


def remove_addr(state_dir: Path, address: str) -> None:
    path = state_dir / ADDR_FILE
    with contextlib.suppress(OSError):
        # Only our own: a server started meanwhile (a reload) may have written its own.
        if path.read_text().strip() == address:
            path.unlink()
