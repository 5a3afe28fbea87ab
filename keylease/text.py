"""Strings from a node or a certificate, made safe to show: the one escaping function.

Node names are checked, but node metadata, the issuer and subject names of refused EK
certificates, watch reasons and error texts that quote them arrive unchecked. Wherever such a
string reaches a terminal, a log line or an audit row it passes through ``printable`` first, so it
can neither move the cursor, recolour or clear a terminal (escape sequences), nor forge a second
log line (newlines), nor reorder what is shown (bidirectional overrides).
"""

from __future__ import annotations

__all__ = ["printable"]

ELLIPSIS = "..."


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(value: str, limit: int | None = None) -> str:
    """``value`` with every character that is not printable (C0/C1 controls, DEL, newlines, line
    and paragraph separators, format characters such as bidirectional overrides and zero-width
    joiners, surrogates, unassigned code points) written as a visible ``\\xNN``/``\\uNNNN``
    escape; printable text, spaces included, is unchanged. With ``limit``, at most that many
    characters of ``value`` are kept (``...`` marks the cut).

    Idempotent: an escaped string is printable, so escaping it again changes nothing (a
    backslash is printable and left as it is).
    """
    text = value if limit is None or len(value) <= limit else value[:limit]
    if text.isprintable():
        escaped = text
    else:
        escaped = "".join(ch if ch.isprintable() else _escape(ch) for ch in text)
    return escaped + ELLIPSIS if text is not value else escaped
