"""``sandbox.files``: read, write, list and copy files inside the sandbox."""

from __future__ import annotations

import base64
import builtins
import logging
from pathlib import Path
from typing import Literal, overload

import anyio
from pydantic import BaseModel

from stockade.protocol.messages import (
    FsEntry,
    FsListParams,
    FsListResult,
    FsMkdirParams,
    FsReadParams,
    FsReadResult,
    FsRemoveParams,
    FsStatParams,
    FsWriteParams,
    TarDownloadParams,
    TarUploadParams,
    TransferReadParams,
    TransferReadResult,
    TransferResult,
    TransferWriteParams,
    TransferWriteResult,
)
from stockade.sandbox.ports import FILE_CHUNK, AgentPort, b64

__all__ = ["AsyncFiles"]

logger = logging.getLogger(__name__)


class AsyncFiles:
    """``sandbox.files``: read and write files inside the sandbox."""

    def __init__(self, sandbox: AgentPort) -> None:
        self._sandbox = sandbox

    def _abs(self, path: str) -> str:
        if path.startswith("/"):
            return path
        return f"{self._sandbox.policy.workspace.guest_path.rstrip('/')}/{path}"

    @overload
    async def read(self, path: str, *, format: Literal["text"] = "text") -> str: ...

    @overload
    async def read(self, path: str, *, format: Literal["bytes"]) -> bytes: ...

    async def read(self, path: str, *, format: Literal["text", "bytes"] = "text") -> str | bytes:
        """Read a whole file (relative paths are inside the workspace)."""
        out = bytearray()
        offset = 0
        while True:
            result = await self._sandbox._call(
                "fs.read", FsReadParams(path=self._abs(path), offset=offset, length=FILE_CHUNK)
            )
            assert isinstance(result, FsReadResult)
            chunk = base64.b64decode(result.data)
            out += chunk
            offset += len(chunk)
            if result.eof or not chunk:
                break
        return bytes(out) if format == "bytes" else out.decode("utf-8", "replace")

    async def write(self, path: str, data: str | bytes, *, mode: int | None = None) -> int:
        """Create or replace a file; returns its size."""
        raw = data.encode() if isinstance(data, str) else data
        target = self._abs(path)
        size = 0
        for i in range(0, max(len(raw), 1), FILE_CHUNK):
            chunk = raw[i : i + FILE_CHUNK]
            result = await self._sandbox._call(
                "fs.write",
                FsWriteParams(path=target, data=b64(chunk), append=i > 0, mode=mode),
            )
            size = getattr(result, "size", size)
        self._sandbox._audit("file.written", target=target, details={"bytes": len(raw)})
        return size

    async def stat(self, path: str) -> FsEntry:
        result = await self._sandbox._call("fs.stat", FsStatParams(path=self._abs(path)))
        assert isinstance(result, FsEntry)
        return result

    async def exists(self, path: str) -> bool:
        from stockade._errors import SandboxFileNotFoundError

        try:
            await self.stat(path)
        except SandboxFileNotFoundError:
            return False
        return True

    async def list(self, path: str = ".", *, depth: int = 1) -> list[FsEntry]:
        result = await self._sandbox._call(
            "fs.list", FsListParams(path=self._abs(path), depth=depth)
        )
        assert isinstance(result, FsListResult)
        return list(result.entries)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self._sandbox._call(
            "fs.remove", FsRemoveParams(path=self._abs(path), recursive=recursive)
        )
        self._sandbox._audit("file.removed", target=self._abs(path))

    async def make_dir(self, path: str, *, mode: int = 0o755) -> None:
        await self._sandbox._call("fs.mkdir", FsMkdirParams(path=self._abs(path), mode=mode))

    async def upload(self, source: str | Path, dest: str = ".") -> int:
        """Copy a host file into the sandbox directory ``dest``, or a host directory's
        contents into ``dest`` (like ``download``, the other way); returns the member count.

        Streamed as a tar archive (spooled to disk past 8 MiB, so memory stays bounded).
        """
        import tempfile

        from stockade._tarfile import tarfile

        src = Path(source)
        if not src.exists():
            raise FileNotFoundError(f"{src} does not exist on the host")

        target = self._abs(dest)
        with tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024) as spool:

            def pack() -> None:
                with tarfile.open(fileobj=spool, mode="w") as tar:
                    if src.is_dir():
                        for child in sorted(src.iterdir()):
                            tar.add(child, arcname=child.name)
                    else:
                        tar.add(src, arcname=src.name)
                spool.seek(0)

            await anyio.to_thread.run_sync(pack)
            opened = await self._sandbox._call("fs.upload_tar", TarUploadParams(path=target))
            assert isinstance(opened, TransferResult)
            result: BaseModel | None = None
            while True:
                chunk = spool.read(FILE_CHUNK)
                result = await self._sandbox._call(
                    "transfer.write",
                    TransferWriteParams(transfer=opened.transfer, data=b64(chunk), eof=not chunk),
                )
                if not chunk:
                    break
        assert isinstance(result, TransferWriteResult)
        self._sandbox._audit(
            "file.uploaded", target=target, details={"source": str(src), "files": result.files}
        )
        return result.files

    async def download(self, path: str, dest: str | Path) -> builtins.list[Path]:
        """Copy a sandbox file into the host directory ``dest``, or a sandbox directory's
        contents into ``dest``; returns the paths written.

        The archive comes from the guest, which is not trusted: it is unpacked with
        tarfile's 'data' filter (no absolute paths, no escapes, no devices, no setuid).
        """
        import tempfile

        from stockade._tarfile import tarfile

        out = Path(dest)
        out.mkdir(parents=True, exist_ok=True)
        opened = await self._sandbox._call(
            "fs.download_tar", TarDownloadParams(path=self._abs(path))
        )
        assert isinstance(opened, TransferResult)
        with tempfile.TemporaryFile() as spool:
            while True:
                result = await self._sandbox._call(
                    "transfer.read", TransferReadParams(transfer=opened.transfer)
                )
                assert isinstance(result, TransferReadResult)
                spool.write(base64.b64decode(result.data))
                if result.eof:
                    break
            spool.seek(0)

            written: builtins.list[Path] = []

            def safe(member: tarfile.TarInfo, root: str) -> tarfile.TarInfo | None:
                try:
                    kept = tarfile.data_filter(member, root)
                except tarfile.FilterError as exc:
                    logger.warning("download from %s skipped %s: %s", self._sandbox.name,
                                   member.name, exc)  # fmt: skip
                    return None
                written.append(out / kept.name)
                return kept

            def unpack() -> builtins.list[Path]:
                with tarfile.open(fileobj=spool, mode="r") as tar:
                    tar.extractall(out, filter=safe)
                return written

            return await anyio.to_thread.run_sync(unpack)
