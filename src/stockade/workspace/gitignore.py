"""git's ignore rules (``.gitignore`` syntax and precedence), matched in Python.

The diff needs them for the sandbox's view of the project, whose ``.gitignore`` files may
live in the upper layer: git must never open paths there, so the files are read by the
walker (safely) and matched here. Semantics follow gitignore(5) and git's wildmatch with
FNM_PATHNAME; the unit tests compare the result with ``git check-ignore``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["IgnoreFile", "is_ignored", "parse_ignore"]

_POSIX_CLASSES = {
    "alnum": "a-zA-Z0-9",
    "alpha": "a-zA-Z",
    "blank": " \\t",
    "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9",
    "graph": "\\x21-\\x7e",
    "lower": "a-z",
    "print": "\\x20-\\x7e",
    "punct": "!-/:-@\\[-`{-~",
    "space": " \\t\\n\\r\\f\\v",
    "upper": "A-Z",
    "xdigit": "0-9a-fA-F",
}


@dataclass(frozen=True)
class _Pattern:
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool
    anchored: bool  # matched against the path relative to the file's directory


@dataclass(frozen=True)
class IgnoreFile:
    """The patterns of one ignore file; ``base`` is its directory ("" = project root)."""

    base: str
    patterns: tuple[_Pattern, ...]

    def match(self, path: str, is_dir: bool) -> bool | None:
        """True (ignored), False (re-included by ``!``) or None (no pattern matches)."""
        if self.base:
            if not path.startswith(self.base + "/"):
                return None
            rel = path[len(self.base) + 1 :]
        else:
            rel = path
        name = rel.rsplit("/", 1)[-1]
        for pattern in reversed(self.patterns):
            if pattern.dir_only and not is_dir:
                continue
            subject = rel if pattern.anchored else name
            if pattern.regex.fullmatch(subject):
                return not pattern.negate
        return None


def parse_ignore(data: bytes, base: str = "") -> IgnoreFile:
    """Parse an ignore file's bytes (names that are not UTF-8 go through surrogateescape)."""
    text = data.decode("utf-8", "surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    patterns: list[_Pattern] = []
    for raw in text.split("\n"):
        line = _trim_trailing_spaces(raw)
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if negate:
            line = line[1:]
        dir_only = line.endswith("/")
        line = line.rstrip("/") if dir_only else line
        if not line:
            continue
        anchored = "/" in line
        line = line.lstrip("/") if line.startswith("/") else line
        try:
            regex = re.compile(_translate(line), re.DOTALL)
        except re.error:
            continue  # git ignores patterns it cannot parse too
        patterns.append(_Pattern(regex, negate, dir_only, anchored))
    return IgnoreFile(base, tuple(patterns))


def is_ignored(path: str, is_dir: bool, stack: Sequence[IgnoreFile]) -> bool:
    """Whether ``path`` is ignored by ``stack`` (highest precedence LAST: global excludes,
    info/exclude, then the ``.gitignore`` files from the root down). The caller handles
    "a directory is ignored, so is everything below it"."""
    for ignore_file in reversed(stack):
        result = ignore_file.match(path, is_dir)
        if result is not None:
            return result
    return False


def _trim_trailing_spaces(line: str) -> str:
    end = len(line)
    while end > 0 and line[end - 1] == " ":
        # A space escaped with a backslash stays.
        backslashes = 0
        i = end - 2
        while i >= 0 and line[i] == "\\":
            backslashes += 1
            i -= 1
        if backslashes % 2:
            break
        end -= 1
    return line[:end]


def _translate(pattern: str) -> str:
    """wildmatch (FNM_PATHNAME) -> regular expression."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            j = i
            while j < n and pattern[j] == "*":
                j += 1
            double = j - i >= 2
            at_start = i == 0 or pattern[i - 1] == "/"
            at_end = j == n or pattern[j] == "/"
            if double and at_start and at_end:
                if j == n:
                    out.append(".*")
                    i = j
                else:
                    out.append("(?:.*/)?")
                    i = j + 1
                continue
            out.append("[^/]*")
            i = j
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            translated, i = _translate_class(pattern, i)
            out.append(translated)
        elif c == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


def _translate_class(pattern: str, start: int) -> tuple[str, int]:
    """A ``[...]`` class at ``start``; an unterminated one is a literal ``[``."""
    i = start + 1
    n = len(pattern)
    negate = i < n and pattern[i] in "!^"
    if negate:
        i += 1
    items: list[str] = []
    first = True
    while i < n:
        c = pattern[i]
        if c == "]" and not first:
            body = "".join(items)
            return (f"[^/{body}]" if negate else f"[{body}]"), i + 1
        first = False
        if c == "[" and pattern.startswith("[:", i):
            end = pattern.find(":]", i + 2)
            if end != -1 and pattern[i + 2 : end] in _POSIX_CLASSES:
                items.append(_POSIX_CLASSES[pattern[i + 2 : end]])
                i = end + 2
                continue
        if c == "\\" and i + 1 < n:
            items.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if c == "-" and items and i + 1 < n and pattern[i + 1] != "]":
            items.append("-")
            i += 1
            continue
        items.append(re.escape(c) if c != "-" else "\\-")
        i += 1
    return re.escape("["), start + 1
