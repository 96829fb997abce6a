"""A short, stable digest of a plan: equal inputs, equal fingerprints, on any machine."""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["canonical_json", "fingerprint"]


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no spaces, so dict order never changes the digest.

    Tuples and lists serialise alike on purpose: a plan built from tuples and the same
    plan read back from the ledger as lists must agree.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(obj: Any) -> str:
    """The first 32 hex digits (128 bits) of the sha256 of `canonical_json(obj)`.

    Encoded with surrogatepass because file names that are not valid UTF-8 reach us
    as lone surrogates (os.fsdecode); strict UTF-8 would refuse them, and replacing them
    would let two different names share a fingerprint.
    """
    data = canonical_json(obj).encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()[:32]
