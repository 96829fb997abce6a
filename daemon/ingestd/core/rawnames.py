"""File names that are not valid UTF-8, in a text form every layer can hold.

POSIX names are bytes. Python decodes them with surrogateescape, so a byte that is not
UTF-8 (0x80-0xFF) becomes a lone surrogate U+DC80-U+DCFF: such a str opens the file,
but SQLite, JSON and the backends refuse it. The local source is the one boundary: what
it lists goes through `to_text`, what it opens through `to_os`.

The text form is lossless and reversible: each lone surrogate becomes MARKER plus two
upper-case hex digits of its byte, and a literal MARKER becomes MARKER twice. MARKER is
U+10FFFE, a noncharacter no real name uses, yet valid UTF-8 that SQLite stores. A name
without surrogates or MARKER is left as it is, so ledgers written before this form
existed need no migration.

`display` is what a backend sees: MARKER+XX becomes "%XX" (`caf\\xe9.jpg` becomes the
item `caf%E9.jpg`), a literal MARKER becomes U+FFFD. It is not reversible (a real
file named `caf%E9.jpg` shows the same), so it is used for item keys and messages,
never to find a file.
"""

from __future__ import annotations

import re

__all__ = ["MARKER", "display", "shown", "to_os", "to_text"]

MARKER = "\U0010fffe"

_TO_TEXT = re.compile("[\udc80-\udcff\U0010fffe]")
_FROM_TEXT = re.compile("\U0010fffe(\U0010fffe|[0-9A-F]{2})")
_HEX = "0123456789ABCDEF"


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    if c == MARKER:
        return MARKER + MARKER
    b = ord(c) - 0xDC00
    return MARKER + _HEX[b >> 4] + _HEX[b & 15]


def to_text(name: str) -> str:
    """The text form of a name (or relpath) as os.fsdecode/os.scandir give it."""
    if not _TO_TEXT.search(name):
        return name  # the common case costs one scan and no copy
    return _TO_TEXT.sub(_escape, name)


def _unescape(m: re.Match[str]) -> str:
    g = m.group(1)
    return MARKER if g == MARKER else chr(0xDC00 + int(g, 16))


def to_os(text: str) -> str:
    """The name to hand to os calls: the inverse of `to_text`."""
    if MARKER not in text:
        return text
    return _FROM_TEXT.sub(_unescape, text)


def _display(m: re.Match[str]) -> str:
    g = m.group(1)
    return "\ufffd" if g == MARKER else "%" + g


def display(text: str) -> str:
    """What a backend and a user see of a text-form name: a byte that is not UTF-8 as
    %XX (caf%E9.jpg), a literal U+10FFFE as U+FFFD."""
    if MARKER not in text:
        return text
    return _FROM_TEXT.sub(_display, text)


def shown(os_name: str) -> str:
    """A name as os calls give it, fit for a message stored in the ledger or logged."""
    return display(to_text(os_name))
