"""Byte-stream adapters shared by the backends and egress."""

from __future__ import annotations

from anyio.abc import ByteStream

__all__ = ["PrefixedStream"]


class PrefixedStream(ByteStream):
    """A stream whose first bytes were already read: they are returned again first."""

    def __init__(self, inner: ByteStream, prefix: bytes) -> None:
        self._inner = inner
        self._prefix = prefix

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            return data
        return await self._inner.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self._inner.send(item)

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def aclose(self) -> None:
        await self._inner.aclose()
