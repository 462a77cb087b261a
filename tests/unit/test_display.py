"""Names shown to a human cannot spoof a review: control characters and bad bytes escaped."""

from __future__ import annotations

import os

import pytest

from stockade.workspace.display import display_path


@pytest.mark.parametrize(
    ("path", "shown"),
    [
        ("src/app.py", "src/app.py"),
        ("with space.txt", "with space.txt"),
        ("café/naïve.txt", "café/naïve.txt"),  # printable non-ASCII stays readable
        ("ok.txt\rHIDDEN", '"ok.txt\\rHIDDEN"'),
        ("two\nlines", '"two\\nlines"'),
        ("tab\there", '"tab\\there"'),
        ("\x1b[2Jclear", '"\\x1b[2Jclear"'),
        ("bell\a", '"bell\\a"'),
        ("del\x7f", '"del\\x7f"'),
        ("c1\x9bcsi", '"c1\\x9bcsi"'),
        ('quote"d', '"quote\\"d"'),
        ("back\\slash", '"back\\\\slash"'),
        ("evil\u202etxt.exe", '"evil\\u202etxt.exe"'),  # right-to-left override
        ("zero\u200bwidth", '"zero\\u200bwidth"'),
        ("line\u2028sep", '"line\\u2028sep"'),
        (os.fsdecode(b"caf\xe9\xff.txt"), '"caf\\xe9\\xff.txt"'),
    ],
)
def test_display_path(path: str, shown: str) -> None:
    assert display_path(path) == shown


def test_output_is_always_printable() -> None:
    every = "".join(chr(c) for c in range(0x00, 0x250)) + os.fsdecode(bytes(range(0x80, 0x100)))
    shown = display_path(every)
    assert shown.isprintable()
    assert shown.startswith('"') and shown.endswith('"')
