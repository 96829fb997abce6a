"""`ingestd serve` on the command line: its options (added to cli.py's sub-parser) and
the command itself, so the CLI module keeps one line for each."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from ingestd.server.auth import TOKENS_ENV, ServeError, load_tokens

EXIT_OK, EXIT_CONFIG = 0, 2

EPILOG = """\
Off loopback the server needs a credential (tokens, or client certificates with
--client-ca), and tokens need TLS: it refuses to send bearer tokens over plain HTTP
unless --allow-plain-http says a TLS proxy or a private network protects them.
SIGHUP re-reads --tls-cert and --tls-key for new connections (certificate rotation
without a restart; open connections keep theirs). The key file must be readable by
its owner only (chmod 600). See docs/tls.md."""


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("--store", default="var/datasets", help="store folder (default: var/datasets)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8750)
    p.add_argument("--token-file", help=f"bearer tokens, one per line (also: ${TOKENS_ENV})")
    p.add_argument(
        "--max-body", type=int, default=8 << 30, help="largest request body in bytes (8 GiB)"
    )
    p.add_argument("--log-format", choices=("auto", "console", "json"), default="auto")
    tls = p.add_argument_group("TLS (https; TLS 1.2 or newer)")
    tls.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="the server's certificate chain (PEM), re-read on SIGHUP",
    )
    tls.add_argument(
        "--tls-key",
        metavar="FILE",
        help="its private key (PEM), mode 600: refused when the group or others may read it",
    )
    tls.add_argument(
        "--client-ca",
        metavar="FILE",
        help="require client certificates signed by this CA (mutual TLS), "
        "instead of or beside tokens",
    )
    tls.add_argument(
        "--allow-plain-http",
        action="store_true",
        help="accept tokens over plain HTTP on a non-loopback address (a TLS proxy in "
        "front, or a private network)",
    )


def serve_command(args: argparse.Namespace) -> int:
    """Run `ingestd serve` with parsed arguments (logging is set up by the caller);
    exit 2 when it cannot start as asked."""
    from ingestd.server.app import serve
    from ingestd.server.tls import ServerTls

    try:
        if (args.tls_cert is None) != (args.tls_key is None):
            raise ServeError("--tls-cert and --tls-key go together")
        if args.client_ca is not None and args.tls_cert is None:
            raise ServeError("--client-ca needs --tls-cert and --tls-key (mutual TLS is TLS)")
        tls = None
        if args.tls_cert is not None:
            client_ca = Path(args.client_ca) if args.client_ca else None
            tls = ServerTls(Path(args.tls_cert), Path(args.tls_key), client_ca)
        tokens = load_tokens(args.token_file, os.environ.get(TOKENS_ENV))
        asyncio.run(
            serve(
                Path(args.store),
                args.host,
                args.port,
                tokens,
                args.max_body,
                tls=tls,
                allow_plain_http=args.allow_plain_http,
            )
        )
    except ServeError as e:
        print(f"ingestd serve: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK
