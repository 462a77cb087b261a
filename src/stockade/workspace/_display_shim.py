"""Stand-in for workspace/display.py (ws-txn) until it lands; removed then."""

from __future__ import annotations

import os

__all__ = ["display_path"]

_NAMED = {"\a": "\\a", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\v": "\\v", "\f": "\\f", "\r": "\\r"}


def display_path(path: str) -> str:
    """``path`` safe to print: control characters and undecodable bytes escaped, and the
    whole name quoted when anything was escaped (like git's quotePath)."""
    out: list[str] = []
    escaped = False
    for ch in path:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, carried by surrogateescape
            out.append(f"\\x{code - 0xDC00:02x}")
            escaped = True
        elif ch in _NAMED:
            out.append(_NAMED[ch])
            escaped = True
        elif code < 0x20 or code == 0x7F or 0x80 <= code <= 0x9F:
            out.append(f"\\x{code:02x}")
            escaped = True
        elif ch in ('"', "\\"):
            out.append("\\" + ch)
        elif 0xD800 <= code <= 0xDFFF:
            out.append(os.fsencode(ch).decode("utf-8", "backslashreplace"))
            escaped = True
        else:
            out.append(ch)
    text = "".join(out)
    return f'"{text}"' if escaped else text
