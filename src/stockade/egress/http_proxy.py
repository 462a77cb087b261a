"""The HTTP side of the proxy: request heads (``CONNECT host:port`` or an absolute ``http://``
URI), the origin-form head sent upstream, and the headers of the proxy's own answers.
"""

from __future__ import annotations

import re

from stockade.egress.request import Refusal, Target, parse_authority

__all__ = [
    "HTTP_REASONS",
    "clean_header_value",
    "origin_form_head",
    "parse_absolute_uri",
    "parse_request_head",
]

_TOKEN_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VERSION_RE = re.compile(rb"HTTP/1\.[01]")

# Never forwarded by a proxy (RFC 9110 7.6.1), plus the proxy's own credentials.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
    }
)
# Named in a client's Connection header they would still not be dropped: removing framing
# or Host would make the upstream read the request differently from how it was checked.
_NEVER_DROPPED = frozenset({b"host", b"content-length", b"transfer-encoding"})

HTTP_REASONS = {
    400: "Bad Request",
    403: "Forbidden by stockade network policy",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def clean_header_value(text: str) -> str:
    """``text`` as a header value of the proxy's answer: printable ASCII, at most 512."""
    return re.sub(r"[^\x20-\x7e]", " ", text)[:512]


# --- HTTP request heads ---------------------------------------------------------------------


def parse_request_head(head: bytes) -> tuple[bytes, str, bytes, list[tuple[bytes, bytes]]]:
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise Refusal("malformed request line")
    method, raw_target, version = parts
    if not _TOKEN_RE.fullmatch(method) or not _VERSION_RE.fullmatch(version):
        raise Refusal("malformed request line")
    if not raw_target or any(c <= 0x20 or c >= 0x7F for c in raw_target):
        raise Refusal("malformed request target")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN_RE.fullmatch(name):
            raise Refusal("malformed header line")
        value = value.strip(b" \t")
        if any(c in b"\r\n\x00" for c in value):
            raise Refusal("malformed header value")
        headers.append((name, value))
    return method, raw_target.decode("ascii"), version, headers


def parse_absolute_uri(target: str) -> tuple[Target, str]:
    scheme, sep, rest = target.partition("://")
    if not sep:
        raise Refusal(
            "this is a proxy: send CONNECT host:port or an absolute http:// URI"
            " (origin-form requests are not served)"
        )
    if scheme.lower() != "http":
        raise Refusal(f"scheme {scheme[:16]!r} not supported; use CONNECT for https")
    end = len(rest)
    for delimiter in "/?#":
        index = rest.find(delimiter)
        if index >= 0:
            end = min(end, index)
    authority, path = rest[:end], rest[end:]
    path = path.split("#", 1)[0]
    if not path.startswith("/"):
        path = "/" + path
    return parse_authority(authority, default_port=80), path


def origin_form_head(
    method: bytes,
    path: str,
    version: bytes,
    headers: list[tuple[bytes, bytes]],
    target: Target,
) -> bytes:
    dropped = set(_HOP_BY_HOP)
    for name, value in headers:
        if name.lower() in (b"connection", b"proxy-connection"):
            for item in value.split(b","):
                token = item.strip().lower()
                if token and token not in _NEVER_DROPPED:
                    dropped.add(token)
    # Host comes from the URI that was checked, never from a header the client chose
    # (which would let it reach another site on the same address).
    out = [method + b" " + path.encode("ascii") + b" " + version]
    out.append(b"Host: " + target.authority.encode("ascii"))
    for name, value in headers:
        lower = name.lower()
        if lower in dropped or lower == b"host" or lower.startswith(b"proxy-"):
            continue
        out.append(name + b": " + value)
    # One request per upstream connection: the relay after the head is byte-for-byte, so a
    # second request on the same connection would bypass the rewrite.
    out.append(b"Connection: close")
    return b"\r\n".join(out) + b"\r\n\r\n"
