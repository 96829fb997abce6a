"""Command line: argument parsing and printing; the work happens in runtime/ (run, sync),
the ledger and observe/ (status, retry), the store and sinks (items) and server/ (serve)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ingestd.config import (
    Config,
    ConfigError,
    HttpBackend,
    LocalBackend,
    config_warnings,
    find_config,
    json_schema,
    load_config,
)
from ingestd.core.errors import SyncError
from ingestd.ledger import Ledger, LedgerAt
from ingestd.observe.status import (
    ledger_at,
    live_status,
    raw_watches,
    state_dir_of,
    status_report,
)
from ingestd.runtime.service import AlreadyRunning, running_pid
from ingestd.server.options import add_serve_arguments, serve_command

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        help="config file (default: $INGESTD_CONFIG, ./ingestd.yaml, /etc/ingestd/config.yaml)",
    )


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ingestd",
        description="Keep labeling-platform datasets in step with drop folders.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="run the daemon in the foreground")
    _config_arg(p)
    p = sub.add_parser("sync", help="one pass: scan every watch and sync everything")
    _config_arg(p)
    p.add_argument("--dry-run", action="store_true", help="print what would change; change nothing")
    p = sub.add_parser("check", help="validate the config")
    _config_arg(p)
    sub.add_parser("schema", help="print the config's JSON Schema")
    p = sub.add_parser("status", help="per watch: synced, pending, failed, last errors")
    _config_arg(p)
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--failed",
        nargs="?",
        const="",
        metavar="WATCH",
        help="list every failed item with its reason (of one watch, or all), a page at a time",
    )
    p.add_argument("--limit", type=_positive, default=50, help="items per page (default 50)")
    p.add_argument("--offset", type=int, default=0, help="items to skip (with --failed)")
    p.add_argument("--page", type=_positive, help="page number from 1 (instead of --offset)")
    p = sub.add_parser("items", help="list a dataset's items in the configured store")
    p.add_argument("dataset")
    _config_arg(p)
    p.add_argument("--json", action="store_true")
    add_serve_arguments(sub.add_parser("serve", help="the ingestion HTTP server over a store"))
    p = sub.add_parser("reload", help="ask the running daemon to re-read its config (SIGHUP)")
    _config_arg(p)
    p = sub.add_parser("retry", help="queue failed items again")
    _config_arg(p)
    p.add_argument("watch", nargs="?")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as e:
        where = f"{e.path}: " if e.path else ""
        for problem in e.problems:
            print(f"{where}{problem}", file=sys.stderr)
        return EXIT_CONFIG
    except AlreadyRunning as e:
        pid = f" (pid {e.pid})" if e.pid else ""
        print(f"ingestd is already running on this state_dir{pid}", file=sys.stderr)
        return EXIT_FAILED
    except SyncError as e:  # e.g. `items` against an unreachable or refusing server
        print(f"ingestd {args.command}: {e.reason}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _load(args: argparse.Namespace, *, check_paths: bool = True) -> tuple[Config, Path]:
    path = find_config(args.config)
    return load_config(path, check_paths=check_paths), path


def _dispatch(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "schema":
        print(json.dumps(json_schema(), indent=2))
        return EXIT_OK
    if cmd == "check":
        config, path = _load(args)
        for warning in config_warnings(config):
            print(f"warning: {warning}", file=sys.stderr)
        print(f"{path}: ok ({len(config.watches)} watches, backend {config.backend.kind})")
        return EXIT_OK
    if cmd == "run":
        return _run(args)
    if cmd == "sync":
        return _sync(args)
    if cmd == "status":
        return _status(args)
    if cmd == "items":
        return _items(args)
    if cmd == "retry":
        return _retry(args)
    if cmd == "reload":
        return _reload(args)
    if cmd == "serve":
        return _serve(args)
    raise AssertionError(cmd)


def _run(args: argparse.Namespace) -> int:
    from ingestd.config import parse_config_bytes, read_config_file
    from ingestd.runtime import logs
    from ingestd.runtime.app import App, run_app
    from ingestd.runtime.config_watch import digest_of

    path = find_config(args.config)
    # The bytes the config came from: an edit made before the config watcher starts
    # (while the daemon waits for its ledger, say) is then still seen as an edit.
    content = read_config_file(path)
    config = parse_config_bytes(path, content)
    logs.setup(config.log.level, config.log.format)
    rc = run_app(App(config, path, loaded=digest_of(content)))
    _exit_without_stragglers(rc)
    return rc


def _exit_without_stragglers(rc: int) -> None:
    """The ledger is committed and closed by now. A thread still copying a huge file into
    the store only writes a temp file the store discards on its next start, and one
    stuck in a blocking call (a hung mount) may never return, so exit instead of
    waiting for it (SIGTERM must end the daemon within 10 s)."""
    if any(
        t.is_alive() and not t.daemon
        for t in threading.enumerate()
        if t is not threading.main_thread()
    ):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def _sync(args: argparse.Namespace) -> int:
    from ingestd.runtime import logs
    from ingestd.runtime.app import App
    from ingestd.runtime.once import dry_run, sync_once
    from ingestd.runtime.progress import Progress

    config, path = _load(args)
    tty = sys.stderr.isatty()
    level = config.log.level
    if tty and not args.dry_run and level == "info":
        # One line per item would scroll the progress bars away; problems still show.
        level = "warning"
    logs.setup(level, config.log.format)
    if args.dry_run:
        lines = asyncio.run(dry_run(config))
        for line in lines:
            print(line)
        if not lines:
            print("nothing to do")
        return EXIT_OK
    app = App(config, path)
    return asyncio.run(sync_once(app, Progress(out=sys.stderr, tty=tty)))


def _status(args: argparse.Namespace) -> int:
    path = find_config(args.config)
    rejected: list[dict[str, str]] = []
    at: LedgerAt | None = None
    try:
        config = load_config(path, check_paths=False)
        state_dir, watches = config.state_dir, [(w.name, w.dataset) for w in config.watches]
        at = ledger_at(config)
    except ConfigError as e:
        if not path.exists():
            raise
        # Status must work while the file on disk holds a refused edit: the running
        # daemon reports the problems; without one, they are shown here.
        state_dir, watches = state_dir_of(path), raw_watches(path)
        rejected = [{"field": p.field, "error": p.error} for p in e.problems]
    if args.failed is not None:
        return _status_failed(args, at or LedgerAt(state_dir), [name for name, _ in watches])
    data, why = live_status(state_dir)
    if data is None:
        data = status_report(state_dir, path, watches, at)
        data["daemon"]["live_unavailable"] = why
        if rejected and not data["daemon"]["running"]:
            data["config"]["rejected"] = rejected
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return EXIT_OK
    _print_status(data)
    return EXIT_OK


def _print_status(data: dict[str, Any]) -> None:
    d = data["daemon"]
    print("daemon: " + (f"running (pid {d['pid']})" if d["running"] else "not running"))
    if not d.get("live"):
        print(f"  live status unavailable: {d.get('live_unavailable')}; counts from the ledger")
    print(f"config: {data['config']['path']}")
    if data.get("daemons"):
        # A shared ledger: every daemon using it, and the counts below are the watch's.
        print(f"ledger: {data.get('ledger')}, shared by:")
        for dm in data["daemons"]:
            state = f"stopped {_when(dm['stopped'])}" if dm.get("stopped") else "running"
            print(
                f"  {dm['host']} pid {dm['pid']}: {state}, last heartbeat "
                f"{_when(dm['heartbeat'])} ({max(0.0, time.time() - dm['heartbeat']):.0f}s ago)"
            )
    for r in data["config"]["rejected"]:
        where = f"{r['field']}: " if r["field"] else ""
        print(f"  refused edit: {where}{r['error']}")
    for w in data["watches"]:
        print(
            f"{w['name']} → {w['dataset']}: {w['synced']} synced, {w['pending']} pending, "
            f"{w['failed']} failed"
        )
        if w.get("mode"):
            reason = f" ({w['mode_reason']})" if w.get("mode_reason") else ""
            print(f"  watched by {w['mode']}{reason}")
        if w["problem"]:
            print(f"  problem: {w['problem']}")
        rescan = w.get("last_rescan")
        if rescan:
            print(
                f"  last rescan: {_when(rescan['at'])} ({rescan['reason']}), found "
                f"{rescan['found']}, of which events had missed {rescan['repaired']}"
            )
        if w.get("last_overflow"):
            print(f"  last event overflow: {_when(w['last_overflow'])}")
        for e in w["last_errors"]:
            print(f"  {e['item']!r}: {e['error']}")
        # last_errors lists failed items first, then pending ones that hit an error.
        more = w["failed"] - min(w["failed"], len(w["last_errors"]))
        if more:
            print(f"  … and {more} more: ingestd status --failed {w['name']}")


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _status_failed(args: argparse.Namespace, at: LedgerAt, names: list[str]) -> int:
    """`status --failed [WATCH]`: every failed item with its reason, a page at a time,
    from the ledger (whether or not the daemon runs)."""
    watch = args.failed or None
    if watch is not None and watch not in names:
        print(f"no watch named {watch!r} (watches: {', '.join(names)})", file=sys.stderr)
        return EXIT_CONFIG
    offset = (args.page - 1) * args.limit if args.page else max(0, args.offset)
    total, page = 0, []
    if at.exists():
        ledger = Ledger(at, readonly=True)
        try:
            total, page = ledger.failed_items(watch, args.limit, offset)
        finally:
            ledger.close()
    following = offset + len(page) if offset + len(page) < total else None
    if args.json:
        out = {"watch": watch, "total": total, "offset": offset, "limit": args.limit}
        print(json.dumps({**out, "next_offset": following, "items": page}, indent=2))
        return EXIT_OK
    for it in page:
        print(f"{it['watch']}\t{it['item']}\t{it['error']}")
    if not page:
        print(f"no failed items{f' in watch {watch!r}' if watch else ''} at offset {offset}")
    else:
        print(f"failed items {offset + 1}-{offset + len(page)} of {total}", file=sys.stderr)
    if following is not None:
        which = f" {watch}" if watch else ""
        print(
            f"next: ingestd status --failed{which} --limit {args.limit} --offset {following}",
            file=sys.stderr,
        )
    return EXIT_OK


def _items(args: argparse.Namespace) -> int:
    config, _ = _load(args, check_paths=False)
    items = asyncio.run(_list_items(config, args.dataset))
    if args.json:
        print(json.dumps(items, indent=2, ensure_ascii=False))
        return EXIT_OK
    for it in items:
        files = sum(len(s["files"]) for s in it["slots"])
        print(f"{it['key']}\tv{it['version']}\t{len(it['slots'])} slots, {files} files")
    if not items:
        print(f"no items in dataset {args.dataset!r}", file=sys.stderr)
    return EXIT_OK


async def _list_items(config: Config, dataset: str) -> list[dict[str, Any]]:
    backend = config.backend
    if isinstance(backend, HttpBackend):
        from ingestd.sinks.http import HttpSink

        sink = HttpSink.from_backend(backend)
        try:
            return [item async for item in sink.list_items(dataset)]
        finally:
            await sink.close()
    if not isinstance(backend, LocalBackend):
        raise SyncError(
            f"items lists the local store or an ingestd server; the {backend.kind} backend's "
            "datasets are listed in the platform itself"
        )
    from ingestd.store.catalog import Catalog

    catalog_path = Path(backend.path) / "catalog.sqlite"
    if not catalog_path.exists():
        return []
    catalog = Catalog(catalog_path)
    try:
        return catalog.list_items(dataset)
    finally:
        catalog.close()


def _serve(args: argparse.Namespace) -> int:
    from ingestd.runtime import logs

    logs.setup("info", args.log_format)
    return serve_command(args)


def _retry(args: argparse.Namespace) -> int:
    config, _ = _load(args, check_paths=False)
    if args.watch is not None and args.watch not in {w.name for w in config.watches}:
        names = ", ".join(w.name for w in config.watches)
        print(f"no watch named {args.watch!r} (watches: {names})", file=sys.stderr)
        return EXIT_CONFIG
    at = ledger_at(config)
    if not at.exists():
        print("nothing to retry (no ledger yet)")
        return EXIT_OK
    ledger = Ledger(at)
    try:
        n = ledger.retry(args.watch)
    finally:
        ledger.close()
    print(f"queued {n} failed items again")
    pid = running_pid(config.state_dir)
    if pid is not None:
        # The daemon polls the ledger anyway; the signal makes it re-plan failed files now.
        os.kill(pid, signal.SIGUSR1)
    return EXIT_OK


def _reload(args: argparse.Namespace) -> int:
    path = find_config(args.config)
    problems: list[str] = []
    try:
        state_dir = load_config(path).state_dir
    except ConfigError as e:
        problems = [str(p) for p in e.problems]
        state_dir = state_dir_of(path)
    pid = running_pid(state_dir)
    if pid is None:
        print(f"no ingestd is running on state_dir {state_dir}", file=sys.stderr)
        return EXIT_FAILED
    os.kill(pid, signal.SIGHUP)
    print(f"asked ingestd (pid {pid}) to reload {path}")
    if problems:
        for problem in problems:
            print(f"{path}: {problem}", file=sys.stderr)
        print("the daemon refuses this edit and keeps its current config", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
