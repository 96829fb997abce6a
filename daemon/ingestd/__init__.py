"""ingestd keeps labeling-platform datasets in step with drop folders and bucket prefixes.

The public surface is small on purpose (docs/design.md):

- `load_config(path)`: the validated config (ConfigError names every problem);
- `run(config)`: the daemon in the foreground, as `ingestd run`;
- `sync_once(config, dry_run=False)`: one pass, as `ingestd sync`;
- `Source`, `Sink`: the interfaces a new kind of source or backend implements;
- `__version__`.

Names are loaded on first use, so `import ingestd` stays cheap and importing any one
part of the package does not drag in the daemon's runtime.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ingestd.config import load_config
    from ingestd.core.source import Source
    from ingestd.sinks.base import Sink

try:
    __version__ = version("ingestd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["Sink", "Source", "__version__", "load_config", "run", "sync_once"]

_LAZY = {
    "load_config": ("ingestd.config", "load_config"),
    "Source": ("ingestd.core.source", "Source"),
    "Sink": ("ingestd.sinks.base", "Sink"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'ingestd' has no attribute {name!r}")


def _config_args(config: str | Path | None) -> list[str]:
    return ["-c", str(config)] if config is not None else []


def run(config: str | Path | None = None) -> int:
    """Run the daemon in the foreground until SIGTERM or SIGINT; its exit status. The
    config is found as `ingestd run` finds it when not given."""
    from ingestd.cli import main

    return main(["run", *_config_args(config)])


def sync_once(config: str | Path | None = None, *, dry_run: bool = False) -> int:
    """One pass over every watch, as `ingestd sync`: 0 when all is synced, 1 if anything
    failed or could not be listed, 2 for an invalid config."""
    from ingestd.cli import main

    return main(["sync", *_config_args(config), *(["--dry-run"] if dry_run else [])])
