"""The microVM's upper layer travels as a stream, and files with holes come back with holes."""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

from stockade._errors import WorkspaceError
from stockade.backends.microvm.upper import import_upper

WSYNC = Path(__file__).resolve().parents[2] / "src/stockade/images/guest/wsync.py"
GIB = 1024**3
MIB = 1024**2


def _wsync() -> ModuleType:
    spec = importlib.util.spec_from_file_location("wsync_under_test", WSYNC)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _holes_supported(directory: Path) -> bool:
    probe = directory / ".probe"
    with open(probe, "wb") as f:
        f.truncate(64 * MIB)
    try:
        return _allocated(probe) < MIB
    finally:
        probe.unlink()


@pytest.fixture
def guest_upper(tmp_path: Path) -> Path:
    upper = tmp_path / "guest"
    upper.mkdir()
    if not _holes_supported(upper):
        pytest.skip(f"{tmp_path} keeps no holes in files")
    with open(upper / "big.img", "wb") as f:
        f.write(b"head")
        f.seek(GIB // 2)
        f.write(b"middle")
        f.truncate(GIB)
    with open(upper / "empty.img", "wb") as f:
        f.truncate(64 * MIB)
    with open(upper / "tail.img", "wb") as f:
        f.seek(8 * MIB)
        f.write(b"end")
    (upper / "plain.txt").write_text("dense\n")
    return upper


def test_sparse_files_stream_and_come_back_sparse(guest_upper: Path, tmp_path: Path) -> None:
    archive = tmp_path / "stream.tar"
    with archive.open("wb") as out:
        proc = subprocess.run(
            [sys.executable, "-S", "-I", str(WSYNC), str(guest_upper), "-"],
            stdout=out,
            stderr=subprocess.PIPE,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr
    assert archive.stat().st_size < MIB  # only the data travelled, not 1 GiB of zeros
    if shutil.which("tar"):  # the format is GNU tar's own: it reads the real names
        listing = subprocess.run(["tar", "-tf", str(archive)], capture_output=True, text=True)
        assert sorted(listing.stdout.split()) == ["big.img", "empty.img", "plain.txt", "tail.img"]

    host_upper = tmp_path / "upper"
    host_upper.mkdir()
    with archive.open("rb") as f:
        assert import_upper(f, host_upper) == 4
    big = host_upper / "big.img"
    assert big.stat().st_size == GIB
    assert _allocated(big) < 4 * MIB
    with big.open("rb") as f:
        assert f.read(4) == b"head"
        f.seek(GIB // 2 - 2)
        assert f.read(10) == b"\0\0middle\0\0"
    assert (host_upper / "empty.img").stat().st_size == 64 * MIB
    assert _allocated(host_upper / "empty.img") < MIB
    tail = (host_upper / "tail.img").read_bytes()
    assert len(tail) == 8 * MIB + 3 and tail.endswith(b"end") and not tail[: 8 * MIB].strip(b"\0")
    assert (host_upper / "plain.txt").read_text() == "dense\n"


def test_a_file_that_shrinks_while_packed_is_padded(tmp_path: Path) -> None:
    wsync = _wsync()
    path = tmp_path / "shrunk"
    path.write_bytes(b"ab")  # was 6 bytes when its size was taken
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = wsync._Ranges(b"map\n", fd, [(0, 6)])
        assert reader.read(3) + reader.read(100) == b"map\nab" + bytes(4)
    finally:
        os.close(fd)


def _sparse_archive(regions: list[tuple[int, int]], realsize: int, map_text: bytes) -> io.BytesIO:
    data = map_text + bytes(-len(map_text) % 512) + b"x" * sum(n for _, n in regions)
    info = tarfile.TarInfo("GNUSparseFile.0/sparse")
    info.size = len(data)
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": "f",
        "GNU.sparse.realsize": str(realsize),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


def _map(regions: list[tuple[int, int]]) -> bytes:
    return (f"{len(regions)}\n" + "".join(f"{o}\n{n}\n" for o, n in regions)).encode()


@pytest.mark.parametrize(
    ("regions", "realsize", "map_text"),
    [
        ([(0, 4), (2, 4)], 100, None),  # overlapping
        ([(50, 4), (0, 4)], 100, None),  # out of order
        ([(98, 4)], 100, None),  # past the end
        ([(0, 4)], 100, b"1\nzero\n4\n"),  # not a number
        ([(0, 4)], 100, b"5\n0\n4\n"),  # a map longer than what follows
    ],
)
def test_hostile_sparse_maps_are_refused(
    tmp_path: Path, regions: list[tuple[int, int]], realsize: int, map_text: bytes | None
) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "keep").write_text("kept")
    archive = _sparse_archive(regions, realsize, map_text or _map(regions))
    with pytest.raises(WorkspaceError):
        import_upper(archive, upper)
    assert (upper / "keep").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upper"]


def test_a_valid_hand_made_sparse_member_is_written_at_its_offsets(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    regions = [(10, 4), (40, 4)]
    assert import_upper(_sparse_archive(regions, 64, _map(regions)), upper) == 1
    content = (upper / "f").read_bytes()
    assert content == bytes(10) + b"xxxx" + bytes(26) + b"xxxx" + bytes(20)
