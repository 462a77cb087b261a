"""Workspace paths made safe to show a human: a file name chosen by a sandbox must not be able
to move the cursor, rewrite the line or hide part of a review (``ok.txt\\rHIDDEN``)."""

from __future__ import annotations

import unicodedata

__all__ = ["display_path"]

_SIMPLE = {
    "\a": "\\a",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\v": "\\v",
    "\f": "\\f",
    "\r": "\\r",
    '"': '\\"',
    "\\": "\\\\",
}
# Unicode categories shown escaped: controls (C0, DEL, C1), format characters (bidi overrides
# and zero-width characters that reorder or hide text), line/paragraph separators,
# surrogates, private-use and unassigned code points.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def display_path(path: str) -> str:
    """``path`` as it is safe to print, quoted and escaped when needed (like git's quotePath).

    A path of printable characters is returned unchanged. Otherwise the result is wrapped in
    double quotes, with C escapes for ``\\a \\b \\t \\n \\v \\f \\r \\" \\\\``, ``\\xNN`` for
    other control characters and for bytes that were not valid UTF-8 (carried as
    surrogateescape code points U+DC80..U+DCFF), and ``\\uXXXX`` / ``\\UXXXXXXXX`` for other
    invisible or reordering characters.
    """
    out: list[str] = []
    quoted = False
    for char in path:
        escaped = _escape(char)
        if escaped is None:
            out.append(char)
        else:
            out.append(escaped)
            quoted = True
    text = "".join(out)
    return f'"{text}"' if quoted else text


def _escape(char: str) -> str | None:
    if char in _SIMPLE:
        return _SIMPLE[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte kept by os.fsdecode
        return f"\\x{code - 0xDC00:02x}"
    if char.isprintable() and unicodedata.category(char) not in _UNSAFE_CATEGORIES:
        return None
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
