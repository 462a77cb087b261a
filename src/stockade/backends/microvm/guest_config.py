"""What a microVM sandbox's guest is given: the launcher's configuration frame (clock,
entropy, hostname, files, environment, agent options) and its workspace, streamed as
entries or built into a disk image.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

from stockade._errors import SandboxStartError
from stockade.backends.base import LaunchSpec

__all__ = [
    "GUEST_DOCKER_SOCKET",
    "GUEST_LOWER",
    "GUEST_STATE",
    "GUEST_UID",
    "GUEST_UPPER",
    "STREAM_LIMIT",
    "build_guest_config",
    "copy_sparse",
    "disk_bucket",
    "make_disk",
    "tree_entries",
    "tree_size",
]

#: The guest's private Docker daemon socket (``images/guest/launcher.py`` starts dockerd).
GUEST_DOCKER_SOCKET = "/run/docker.sock"
#: Trees up to this size are streamed over the channel; larger ones get a disk image.
STREAM_LIMIT = 8 * 1024 * 1024
GUEST_STATE = "/run/stockade"
GUEST_UPPER = "/run/stockade/ws/upper"
GUEST_LOWER = "/run/stockade/ws/lower"
#: Commands run as this uid/gid inside the VM unless ``microvm.user = "root"``.
GUEST_UID = 1000


def _etc_files(spec: LaunchSpec) -> list[tuple[str, bytes, int]]:
    hostname = spec.policy.hostname
    home = spec.policy.env.get("HOME", "/tmp/home")
    passwd = (
        "root:x:0:0:root:/root:/bin/sh\n"
        f"user:x:{GUEST_UID}:{GUEST_UID}:sandbox user:{home}:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
    group = f"root:x:0:\nuser:x:{GUEST_UID}:\nnogroup:x:65534:\n"
    local_names = spec.egress.local_names if spec.egress is not None else ()
    hosts = f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost\n" + "".join(
        f"127.0.0.1\t{name}\n" for name in local_names
    )
    return [
        ("/etc/hosts", hosts.encode(), 0o644),
        ("/etc/hostname", f"{hostname}\n".encode(), 0o644),
        ("/etc/passwd", passwd.encode(), 0o644),
        ("/etc/group", group.encode(), 0o644),
    ]


def build_guest_config(
    spec: LaunchSpec, *, workspace: dict[str, Any] | None, now_ns: int, seed: bytes
) -> dict[str, Any]:
    """The launcher's configuration frame for one sandbox (see images/guest/launcher.py)."""
    policy = spec.policy
    ws = policy.workspace
    files = _etc_files(spec)
    env = dict(policy.env)
    if spec.egress is not None:
        env.update(spec.egress.env)
        for host_file, guest_file in spec.egress.files:
            files.append((guest_file, Path(host_file).read_bytes(), 0o444))
    home = env.get("HOME")
    cwd = ws.guest_path if workspace is not None else (home or "/")
    args = ["--workspace", cwd]
    if spec.egress is not None:
        args += spec.egress.agent_args()
    args += ["--rlimit", "core=0"]
    as_user = policy.microvm.user == "user"
    if policy.limits.pids and as_user:
        # The VM's size bounds memory; processes are bounded per user (root is exempt).
        args += ["--rlimit", f"nproc={policy.limits.pids}"]
    config: dict[str, Any] = {
        "time_ns": now_ns,
        "seed": base64.b64encode(seed).decode(),
        "hostname": policy.hostname,
        "files": [[path, base64.b64encode(data).decode(), mode] for path, data, mode in files],
        "env": env,
        "args": args,
        "dirs": [home] if home else [],
    }
    if policy.limits.disk_bytes:
        config["disk_bytes"] = int(policy.limits.disk_bytes)
    if as_user:
        config["user"] = [GUEST_UID, GUEST_UID]
    if policy.docker:
        # A private dockerd in this VM; the sandbox user reaches it through its socket's group.
        env["DOCKER_HOST"] = f"unix://{GUEST_DOCKER_SOCKET}"
        config["docker"] = {"socket": GUEST_DOCKER_SOCKET, "group": "user" if as_user else "root"}
        if policy.limits.disk_bytes:
            config["docker"]["size"] = int(policy.limits.disk_bytes)
    if workspace is not None:
        config["workspace"] = workspace
    return config


def tree_entries(root: Path) -> list[list[Any]]:
    """A project tree for the guest, streamed inside its configuration: ``[kind, path, mode,
    mtime, payload]`` per entry, parents first; kinds ``d`` (directory), ``f`` (file, base64
    content), ``l`` (symlink, target) and ``h`` (hard link to an earlier path). Special
    files are left out. The guest extracts them with the agent's checked tar extraction,
    without importing ``tarfile`` (under emulation, that import chain alone costs about a
    second of a cold boot)."""
    entries: list[list[Any]] = []
    seen: dict[tuple[int, int], str] = {}
    for top, dirs, files in os.walk(root):
        dirs.sort()
        rel_top = os.path.relpath(top, root)
        prefix = "" if rel_top == "." else rel_top + "/"
        for name in sorted(dirs + files):
            path = os.path.join(top, name)
            info = os.lstat(path)
            mode, mtime, rel = stat.S_IMODE(info.st_mode), int(info.st_mtime), prefix + name
            if stat.S_ISDIR(info.st_mode):
                entries.append(["d", rel, mode, mtime, ""])
            elif stat.S_ISLNK(info.st_mode):
                entries.append(["l", rel, mode, mtime, os.readlink(path)])
            elif stat.S_ISREG(info.st_mode):
                key = (info.st_dev, info.st_ino)
                if info.st_nlink > 1 and key in seen:
                    entries.append(["h", rel, mode, mtime, seen[key]])
                    continue
                seen[key] = rel
                data = base64.b64encode(Path(path).read_bytes()).decode()
                entries.append(["f", rel, mode, mtime, data])
    return entries


def tree_size(root: Path, limit: int) -> int:
    """Bytes of regular files under ``root``, counting stops once past ``limit``."""
    total = 0
    for top, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(top, name))
                total += st.st_size
        if total > limit:
            return total
    return total


def disk_bucket(size: int) -> int:
    """Workspace disk size: a power of two >= 2x the tree (>= 256 MiB), sparse."""
    want = max(256 * 1024 * 1024, 2 * size + 64 * 1024 * 1024)
    return 1 << (want - 1).bit_length()


def make_disk(tree: Path, image: Path, size: int) -> None:
    mke2fs = shutil.which("mke2fs") or "/usr/sbin/mke2fs"
    # In a user namespace that maps the caller to the guest user, mke2fs records the
    # caller's files as that user's: the sandbox owns its workspace, as on every backend.
    owner = f"{GUEST_UID}:{GUEST_UID}"
    proc = subprocess.run(
        ["unshare", "--user", f"--map-user={GUEST_UID}", f"--map-group={GUEST_UID}",
         mke2fs, "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-E", f"root_owner={owner}",
         "-d", str(tree), str(image), f"{size // 1024}k"],
        capture_output=True,
        check=False,
        timeout=600,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SandboxStartError(
            f"mke2fs could not build the workspace disk from {tree}: "
            f"{proc.stderr.decode(errors='replace')[-500:]}; install e2fsprogs or use a "
            "smaller workspace"
        )


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy a (sparse) disk image keeping holes, with reflinks where the filesystem has them."""
    subprocess.run(
        ["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)],
        check=True,
        capture_output=True,
    )
