"""One item's verdict from the errors of its parts (the files of a slot group, the
images a Nucleus item is split into, the requests a V7 item needs): the error that
says most about the item wins."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from ingestd.core.errors import PermanentError, RetriableError, SourceChangedError

# A cancel (the daemon is stopping) first; then a changed source (the item is redone
# anyway, once the file settles); then a rejection (retrying cannot help); then the rest.
_ORDER = (asyncio.CancelledError, SourceChangedError, PermanentError, RetriableError)


def worst(errors: Iterable[BaseException | None]) -> BaseException | None:
    """The error that says most about an item whose parts failed in different ways
    (None among `errors` are parts that did not fail; None back when none did)."""
    errs = [e for e in errors if e is not None]
    for kind in _ORDER:
        for e in errs:
            if isinstance(e, kind):
                return e
    return errs[0] if errs else None
