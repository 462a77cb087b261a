"""A sandbox's own small filesystem: ``limits.disk`` as a hard bound on what it can write.

With ``limits.disk`` set, a sparse ext4 image of exactly that many bytes is made in the
sandbox's state directory (``disk.ext4``) and loop-mounted at ``disk/``; the workspace's upper
and work layers and the sandbox's ``/tmp`` (with its home and caches) live on it. A write past
the limit fails inside the sandbox with ENOSPC, and the image file on the host can never grow
beyond the limit, whatever the backend. The image stays on disk with the sandbox's record, so
its changes can be reviewed after it stopped: the mount is kept while the record exists, made
again on demand (after a reboot) by ``layer_root``, and undone by ``remove_state_dir`` (the loop
device is set to clear itself once the filesystem is unmounted everywhere; removing the mount
point also detaches the copies other sandboxes' mount namespaces took of it).

Loop mounts need root. Unprivileged, ``create_disk`` logs a warning and returns False: the
sandbox then runs with the older bound (only its ``/tmp`` tmpfs is sized), which ``stockade
doctor`` reports.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import secrets
import shutil
import struct
import subprocess
import time
from pathlib import Path

from stockade._errors import WorkspaceError

__all__ = [
    "DISK_DIR",
    "DISK_IMAGE",
    "MIN_DISK_BYTES",
    "create_disk",
    "disk_support",
    "fresh_tmp",
    "has_disk",
    "layer_root",
    "release_disk",
    "remove_state_dir",
]

logger = logging.getLogger(__name__)

#: The image file and its mount point, in the sandbox's state directory.
DISK_IMAGE = "disk.ext4"
DISK_DIR = "disk"
#: The sandbox's /tmp on its disk (emptied at every start, like a tmpfs).
_TMP = "tmp"
#: Below this, ext4's own metadata leaves too little room to be useful.
MIN_DISK_BYTES = 8 * 2**20

_TOOL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
#: Options of the loop mount: no device files or set-id programs from the sandbox's writes;
#: ``discard`` gives the host back the space of deleted files (the image stays sparse);
#: ``noinit_itable``: the image is a fresh sparse file, its unwritten inode tables already
#: read as zeros, so ext4's background zeroing would only fill the host's disk.
_MOUNT_OPTIONS = "loop,nosuid,nodev,noatime,discard,noinit_itable"


def _tool(name: str) -> str | None:
    return shutil.which(name, path=_TOOL_PATH)


def disk_support() -> tuple[bool, str]:
    """(True, how) when ``limits.disk`` can bound the upper layer here, else (False, why)."""
    if os.geteuid() != 0:
        return False, (
            "limits.disk bounds only /tmp when stockade runs unprivileged (a loop-mounted "
            "filesystem per sandbox needs root); the workspace's upper layer is not bounded"
        )
    if _tool("mkfs.ext4") is None:
        return False, (
            "limits.disk needs mkfs.ext4 (install e2fsprogs); the workspace's upper layer "
            "is not bounded"
        )
    if not os.path.exists("/dev/loop-control"):
        return False, (
            "limits.disk needs loop devices (/dev/loop-control is missing: modprobe loop); "
            "the workspace's upper layer is not bounded"
        )
    return True, (
        "limits.disk: the workspace's upper layer, /tmp and home live on a per-sandbox ext4 "
        "image of exactly that size (loop-mounted); writes past it fail with ENOSPC"
    )


def has_disk(state_dir: Path) -> bool:
    """Whether the sandbox of ``state_dir`` was given a disk of its own."""
    return os.path.isfile(state_dir / DISK_IMAGE)


def create_disk(state_dir: Path, size_bytes: int) -> bool:
    """Make and mount the sandbox's disk of ``size_bytes``; False when it cannot be done here.

    Raises WorkspaceError when the limit is too small or making the filesystem fails.
    """
    if size_bytes < MIN_DISK_BYTES:
        raise WorkspaceError(
            f"limits.disk = {size_bytes} bytes is too small for the sandbox's filesystem; "
            f"use at least {MIN_DISK_BYTES // 2**20}MiB"
        )
    ok, why = disk_support()
    if not ok:
        logger.warning("%s", why)
        return False
    image = state_dir / DISK_IMAGE
    free = shutil.disk_usage(state_dir).free
    if size_bytes > free:
        logger.warning(
            "limits.disk (%d bytes) is more than the free space of %s (%d bytes): the host's "
            "disk may fill before the sandbox's does",
            size_bytes,
            state_dir,
            free,
        )
    mount_point = state_dir / DISK_DIR
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.ftruncate(fd, size_bytes)  # sparse: costs the host only what is written
        finally:
            os.close(fd)
        mkfs = _tool("mkfs.ext4")
        assert mkfs is not None
        # A journal keeps the sandbox's work consistent across a host crash; lazy init
        # writes nothing the sparse file does not already read as zeros.
        _run(
            [mkfs, "-q", "-F", "-m", "0", "-L", "stockade",
             "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0",
             str(image)],
            f"could not make the sandbox's {size_bytes}-byte filesystem in {str(image)!r}",
        )  # fmt: skip
        mount_point.mkdir(mode=0o700, exist_ok=True)
        _mount(image, mount_point)
    except BaseException:
        # No half-made disk: a later reader would try to mount it.
        with contextlib.suppress(OSError):
            os.unlink(image)
        with contextlib.suppress(OSError):
            os.rmdir(mount_point)
        raise
    with contextlib.suppress(OSError):
        os.rmdir(mount_point / "lost+found")
    os.chmod(mount_point, 0o700)
    return True


def layer_root(state_dir: Path) -> Path:
    """Where the upper and work layers of ``state_dir`` live: the sandbox's mounted disk when
    it has one (mounted now if it is not, e.g. after a reboot), else ``state_dir`` itself."""
    if not has_disk(state_dir):
        return state_dir
    return ensure_mounted(state_dir)


def ensure_mounted(state_dir: Path) -> Path:
    """Mount the sandbox's disk at ``state_dir/disk`` unless it already is; return that path."""
    mount_point = state_dir / DISK_DIR
    image = state_dir / DISK_IMAGE
    if os.path.ismount(mount_point):
        return mount_point
    if os.geteuid() != 0:
        raise WorkspaceError(
            f"the workspace of this sandbox is on its own disk image {str(image)!r}, which "
            "is not mounted, and mounting it needs root; run the command as root"
        )
    # Two processes mounting one image at once would mount one filesystem twice.
    fd = os.open(image, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not os.path.ismount(mount_point):
            mount_point.mkdir(mode=0o700, exist_ok=True)
            _mount(image, mount_point)
    finally:
        os.close(fd)
    return mount_point


def fresh_tmp(state_dir: Path, owner: int = 0) -> Path | None:
    """The sandbox's /tmp on its disk, emptied, with ``home`` (mode 0700, ``owner``) in it.

    None when the sandbox has no disk (its /tmp stays a tmpfs).
    """
    if not has_disk(state_dir):
        return None
    from stockade.workspace.removal import remove_tree

    root = ensure_mounted(state_dir)
    tmp = root / _TMP
    if os.path.lexists(tmp):
        os.rename(tmp, root / f".{_TMP}.discard-{secrets.token_hex(6)}")
    for name in os.listdir(root):  # this one, and any an interrupted start left
        if name.startswith(f".{_TMP}.discard-"):
            remove_tree(root / name)
    os.mkdir(tmp, 0o700)
    os.chmod(tmp, 0o1777)  # noqa: S103 - the sandbox's /tmp, under the 0700 disk root
    home = tmp / "home"
    os.mkdir(home, 0o700)
    os.chown(home, owner, owner)
    return tmp


def release_disk(state_dir: Path) -> None:
    """Unmount the sandbox's disk and free its loop device (before removing ``state_dir``).

    Quiet when there is none. Raises WorkspaceError when it stays mounted.
    """
    mount_point = state_dir / DISK_DIR
    image = state_dir / DISK_IMAGE
    for _ in range(8):  # mounted twice (by hand): unmount every layer
        if not os.path.ismount(mount_point):
            break
        error = _umount(mount_point)
        if error and os.path.ismount(mount_point):
            # Busy (a process of the sandbox that escaped teardown still has a file open):
            # detach it now, the kernel drops it and the loop device when it is let go.
            logger.warning("the disk of %s is busy (%s); detaching it lazily", state_dir, error)
            _umount(mount_point, lazy=True)
    if os.path.ismount(mount_point):
        raise WorkspaceError(
            f"could not unmount the sandbox's disk at {str(mount_point)!r}; unmount it with "
            f"`umount {mount_point}` and remove the sandbox again"
        )
    if os.path.exists(image):
        _detach_loops(image)


def remove_state_dir(state_dir: Path, *, wait: float = 5.0) -> None:
    """Remove a sandbox's state directory: its disk unmounted, then the tree, then the
    loop device seen gone.

    Raises FileNotFoundError when ``state_dir`` does not exist. Removing the mount point
    also detaches the copies of the mount that other sandboxes' mount namespaces hold; a
    process of one that still has a file of the disk open (gVisor's gofer, for a moment
    after its sandbox ended) keeps the loop device until it lets go: waited for up to
    ``wait`` seconds, then logged.
    """
    from stockade.workspace.removal import remove_tree

    image = state_dir / DISK_IMAGE
    had_disk = has_disk(state_dir)
    release_disk(state_dir)
    remove_tree(state_dir)
    if not had_disk:
        return
    deadline = time.monotonic() + wait
    while (held := _backing_loops(image)) and time.monotonic() < deadline:
        time.sleep(0.02)
    if held:
        logger.warning(
            "loop device %s of the removed sandbox disk %s is still held open; the kernel "
            "frees it when its last user exits",
            ", ".join(held),
            image,
        )


def _backing_loops(image: Path) -> list[str]:
    """Loop devices whose backing file is ``image`` (also once it is deleted)."""
    wanted = {os.fsencode(image), os.fsencode(image) + b" (deleted)"}
    found = []
    for entry in Path("/sys/block").glob("loop*"):
        try:
            backing = (entry / "loop" / "backing_file").read_bytes().rstrip(b"\n")
        except OSError:
            continue
        if backing in wanted:
            found.append(f"/dev/{entry.name}")
    return found


_LOOP_CLR_FD = 0x4C01


def _detach_loops(image: Path) -> None:
    """Detach loop devices still backed by ``image`` (one attached without autoclear, by
    hand); a device still in use is only marked to clear itself when let go."""
    for device in _backing_loops(image):
        with contextlib.suppress(OSError):
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, _LOOP_CLR_FD, 0)
            finally:
                os.close(fd)


def _mount(image: Path, mount_point: Path) -> None:
    """Attach ``image`` to a free loop device that clears itself, and mount it.

    Done with the kernel's interfaces directly (a few ms); where they are missing (kernels
    before 5.8 have no LOOP_CONFIGURE), with util-linux's ``mount -o loop`` (~20 ms).
    """
    try:
        if _mount_direct(image, mount_point):
            return
    except OSError as exc:
        raise WorkspaceError(
            f"could not mount the sandbox's disk {str(image)!r} at {str(mount_point)!r}: "
            f"{exc.strerror or exc}; check that loop devices work here (`losetup -f`) or "
            "unset limits.disk"
        ) from exc
    mount = _tool("mount") or "mount"
    _run(
        [mount, "-t", "ext4", "-o", _MOUNT_OPTIONS, str(image), str(mount_point)],
        f"could not mount the sandbox's disk {str(image)!r} at {str(mount_point)!r}",
    )


_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_CONFIGURE = 0x4C0A
_LO_FLAGS_AUTOCLEAR = 4
_MS_NOSUID, _MS_NODEV, _MS_NOATIME = 2, 4, 1024
#: struct loop_config: fd, block_size, struct loop_info64 (device, inode, rdevice, offset,
#: sizelimit, number, encrypt_type, encrypt_key_size, flags, file_name[64], crypt_name[64],
#: encrypt_key[32], init[2]), reserved[8].
_LOOP_CONFIG = struct.Struct("=II5Q4I64s64s32s2Q8Q")


def _mount_direct(image: Path, mount_point: Path) -> bool:
    """Loop-mount ``image`` through LOOP_CONFIGURE and mount(2); False when not supported."""
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    image_fd = os.open(image, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for _ in range(16):  # another process may take the free device first
            number = fcntl.ioctl(control, _LOOP_CTL_GET_FREE)
            try:
                loop_fd = os.open(f"/dev/loop{number}", os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                return False
            try:
                config = _LOOP_CONFIG.pack(
                    image_fd, 0, 0, 0, 0, 0, 0, 0, 0, 0, _LO_FLAGS_AUTOCLEAR,
                    os.fsencode(image)[-63:], b"", b"", 0, 0, *([0] * 8),
                )  # fmt: skip
                try:
                    fcntl.ioctl(loop_fd, _LOOP_CONFIGURE, config)
                except OSError as exc:
                    if exc.errno == errno.EBUSY:
                        continue
                    if exc.errno in (errno.EINVAL, errno.ENOTTY):
                        return False  # no LOOP_CONFIGURE on this kernel
                    raise
                # From here the device detaches itself once unmounted and closed.
                flags = _MS_NOSUID | _MS_NODEV | _MS_NOATIME
                if libc.mount(
                    f"/dev/loop{number}".encode(),
                    os.fsencode(mount_point),
                    b"ext4",
                    ctypes.c_ulong(flags),
                    b"discard,noinit_itable",
                ):
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err), str(mount_point))
                return True
            finally:
                os.close(loop_fd)
        raise OSError(errno.EBUSY, "no free loop device after 16 tries")
    finally:
        os.close(image_fd)
        os.close(control)


def _umount(mount_point: Path, *, lazy: bool = False) -> str:
    """umount2(2); '' when done, else the error."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(mount_point), 2 if lazy else 0):  # 2: MNT_DETACH
        return os.strerror(ctypes.get_errno())
    return ""


def _call(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        argv,
        capture_output=True,
        timeout=60,
        check=False,
        cwd="/",
        env={"PATH": _TOOL_PATH, "LANG": "C"},
    )


def _run(argv: list[str], what: str) -> None:
    try:
        proc = _call(argv)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WorkspaceError(f"{what}: {exc}") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-500:]
        raise WorkspaceError(
            f"{what}: {err or f'exit status {proc.returncode}'}; check that loop devices "
            "work here (`losetup -f`) or unset limits.disk"
        )
