"""MicroVM guest images, built locally: kernel, initramfs and a compressed read-only root.

- kernel: Debian's ``linux-image-cloud-amd64`` bzImage, decompressed to the PVH ``vmlinux``
  ELF (QEMU microvm and Firecracker boot it directly, ~0.2 s faster than the bzImage);
- initramfs: static busybox, the guest init script, the VM launcher, the guest agent and
  the kernel modules the guest needs, in the load order ``modprobe --show-depends`` gives;
- root: the shared Debian root filesystem (``ensure_rootfs``) as an erofs-lz4 image.

Every artefact is cached under ``image_cache_dir()`` by a hash of its inputs and written
under a temporary name that is renamed into place only when complete, so a failed build
leaves no half-written entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from stockade.images.rootfs import (
    ImageBuildError,
    ensure_rootfs,
    find_rootfs,
    image_cache_dir,
    require_tool,
)

__all__ = [
    "GUEST_MODULES",
    "VmImage",
    "ensure_vm_image",
    "extract_vmlinux",
    "find_host_kernel",
    "find_vm_image",
    "module_load_order",
]

#: Bump when the way an artefact is built changes without its inputs changing.
VM_RECIPE_VERSION = 1

#: Modules loaded at boot (their dependencies are added, in order).
GUEST_MODULES = (
    "virtio_mmio",
    "virtio_console",
    "virtio_blk",
    "erofs",
    "overlay",
    "vmw_vsock_virtio_transport",
)
#: Modules shipped but not loaded: root in the guest can load them (e.g. to check that
#: loading a module in the VM leaves the host alone).
EXTRA_MODULES = ("dummy",)

#: The LZ4 legacy frame magic inside a bzImage built with CONFIG_KERNEL_LZ4.
_LZ4_MAGIC = b"\x02\x21\x4c\x18"
_ELF_MAGIC = b"\x7fELF"

Progress = Callable[[str], None]

_GUEST_DIR = Path(__file__).resolve().parent / "guest"


@dataclass(frozen=True)
class VmImage:
    """Everything a microVM boot needs, all read-only files in the cache."""

    profile: str
    #: Hash of all three artefacts: snapshots are keyed by it.
    key: str
    kernel: Path
    kernel_version: str
    initrd: Path
    rootfs: Path


def find_host_kernel() -> tuple[Path, str]:
    """The newest installed Debian kernel with its modules: (bzImage path, version).

    ``STOCKADE_MICROVM_KERNEL`` may name a bzImage or vmlinux explicitly (its version is taken
    from the file name ``vmlinuz-VERSION``).
    """
    explicit = os.environ.get("STOCKADE_MICROVM_KERNEL")
    if explicit:
        path = Path(explicit)
        version = path.name.partition("-")[2]
        if not path.is_file() or not (Path("/lib/modules") / version).is_dir():
            raise ImageBuildError(
                f"STOCKADE_MICROVM_KERNEL={explicit!r} is not a kernel file named vmlinuz-VERSION "
                f"with modules in /lib/modules/VERSION",
                fix="unset STOCKADE_MICROVM_KERNEL or point it at /boot/vmlinuz-<version>",
            )
        return path, version
    candidates: list[tuple[tuple[int, ...], bool, Path, str]] = []
    for path in Path("/boot").glob("vmlinuz-*"):
        version = path.name[len("vmlinuz-") :]
        if not (Path("/lib/modules") / version / "modules.dep").is_file():
            continue
        numbers = tuple(int(n) for n in re.findall(r"\d+", version))
        candidates.append((numbers, "cloud" in version, path, version))
    if not candidates:
        raise ImageBuildError(
            "no guest kernel found: no /boot/vmlinuz-VERSION with modules in /lib/modules/VERSION",
            fix="install Debian's cloud kernel: apt-get install linux-image-cloud-amd64",
        )
    # Prefer the cloud flavour (small, virtio built for VMs), then the newest.
    candidates.sort(key=lambda c: (c[1], c[0]))
    _, _, path, version = candidates[-1]
    return path, version


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Decompress the ELF ``vmlinux`` out of an LZ4 bzImage (or return an ELF as is)."""
    if bzimage.startswith(_ELF_MAGIC):
        return bzimage
    start = bzimage.find(_LZ4_MAGIC)
    if start < 0:
        raise ImageBuildError(
            "the kernel image is not LZ4-compressed (no LZ4 frame magic found); stockade "
            "extracts the uncompressed vmlinux from Debian's LZ4 bzImage",
            fix="use Debian's linux-image-cloud-amd64, or set STOCKADE_MICROVM_KERNEL to a vmlinux",
        )
    lz4 = require_tool("lz4", "decompresses the guest kernel", "lz4")
    # lz4 stops at the end of the frame and complains about the trailing bytes: the
    # output is complete all the same, so judge by the result, not the exit status.
    proc = subprocess.run(
        [lz4, "-dc"], input=bzimage[start:], capture_output=True, check=False, timeout=120
    )
    out = proc.stdout
    if not out.startswith(_ELF_MAGIC):
        raise ImageBuildError(
            f"could not decompress the guest kernel with lz4 (exit {proc.returncode}): "
            f"{proc.stderr.decode(errors='replace')[-500:]}",
            fix="check that the kernel file is intact (reinstall linux-image-cloud-amd64)",
        )
    return out


def module_load_order(version: str, modules: tuple[str, ...]) -> list[Path]:
    """Module files for ``modules`` and their dependencies, each once, dependencies first."""
    try:
        stamp = os.stat(Path("/lib/modules") / version / "modules.dep").st_mtime_ns
    except OSError:
        stamp = 0
    return list(_module_load_order(version, modules, stamp))


@functools.lru_cache(maxsize=16)
def _module_load_order(version: str, modules: tuple[str, ...], _stamp: int) -> tuple[Path, ...]:
    modprobe = shutil.which("modprobe") or "/usr/sbin/modprobe"
    order: list[Path] = []
    for name in modules:
        proc = subprocess.run(
            [modprobe, "-S", version, "--show-depends", name],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        if proc.returncode != 0:
            raise ImageBuildError(
                f"modprobe cannot resolve module {name!r} for kernel {version}: "
                f"{proc.stderr.strip()}",
                fix="install kmod and the kernel's modules (linux-image-cloud-amd64)",
            )
        order.extend(parse_show_depends(proc.stdout))
    seen: set[Path] = set()
    unique: list[Path] = []
    for path in order:
        if path not in seen:
            seen.add(path)
            unique.append(path)
    return tuple(unique)


def parse_show_depends(text: str) -> list[Path]:
    """``insmod /lib/modules/.../x.ko [opts]`` lines -> paths; ``builtin x`` lines skipped."""
    paths: list[Path] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "insmod":
            paths.append(Path(words[1]))
    return paths


def _sha(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def _file_sha(path: Path) -> bytes:
    st = os.stat(path)
    return _file_sha_cached(str(path), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=256)
def _file_sha_cached(path: str, size: int, mtime_ns: int, inode: int) -> bytes:
    """Content hash, memoised by identity: probes recompute image keys on every call."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.digest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path) -> None:
    tmp.chmod(0o644)
    os.replace(tmp, final)


def _kernel(cache: Path, say: Progress) -> tuple[Path, str]:
    bzimage, version = find_host_kernel()
    key = _sha(_file_sha(bzimage), str(VM_RECIPE_VERSION).encode())
    final = cache / f"vmlinux-{version}-{key}"
    if final.is_file():
        return final, version
    data = bzimage.read_bytes()
    say(f"extracting the guest kernel {version} from {bzimage}")
    tmp = cache / f".{final.name}.tmp-{os.getpid()}"
    try:
        tmp.write_bytes(extract_vmlinux(data))
        _publish(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final, version


def guest_files() -> dict[str, Path]:
    """Files copied into the initramfs: name inside ``/stockade`` -> source on the host."""
    from stockade.backends.base import guest_agent_source

    return {
        "init": _GUEST_DIR / "init",
        "launcher.py": _GUEST_DIR / "launcher.py",
        "wsync.py": _GUEST_DIR / "wsync.py",
        "agent.py": guest_agent_source(),
    }


def _has_interpreter(path: Path) -> bool:
    """Whether an ELF64 file has a PT_INTERP program header (is dynamically linked)."""
    import struct

    with path.open("rb") as f:
        head = f.read(64)
        if len(head) < 64 or not head.startswith(_ELF_MAGIC) or head[4] != 2:
            return True  # not an ELF64 we understand: do not trust it
        (phoff,) = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return any(struct.unpack_from("<I", table, i * phentsize)[0] == 3 for i in range(phnum))


def _busybox() -> Path:
    for candidate in (shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"):
        # The initramfs has no libc: a dynamically linked busybox would not run.
        if candidate and Path(candidate).is_file() and not _has_interpreter(Path(candidate)):
            return Path(candidate)
    raise ImageBuildError(
        "a static busybox is needed for the guest initramfs and none was found",
        fix="apt-get install busybox-static",
    )


#: The Python that byte-compiles the agent for the guest: Debian's, like the image's.
HOST_PYTHON = "/usr/bin/python3"


def _precompile(source: Path) -> None:
    """Byte-compile ``source`` next to itself (``.pyc``); the guest uses it only when its
    Python has the same magic number, so a mismatch costs start-up time, nothing else."""
    if not Path(HOST_PYTHON).is_file():
        return
    subprocess.run(
        [HOST_PYTHON, "-S", "-I", "-c",
         "import py_compile,sys; py_compile.compile(sys.argv[1], cfile=sys.argv[1] + 'c', "
         "dfile='/run/stockade/' + sys.argv[2], doraise=True)", str(source), source.name],
        capture_output=True,
        check=False,
        timeout=120,
    )  # fmt: skip


def _initramfs(cache: Path, version: str, say: Progress) -> Path:
    busybox = _busybox()
    modules = module_load_order(version, GUEST_MODULES)
    extra = module_load_order(version, EXTRA_MODULES)
    files = guest_files()
    parts: list[bytes] = [str(VM_RECIPE_VERSION).encode(), version.encode(), _file_sha(busybox)]
    if Path(HOST_PYTHON).is_file():
        parts.append(_file_sha(Path(os.path.realpath(HOST_PYTHON))))
    for path in [*modules, *extra]:
        parts += [str(path).encode(), _file_sha(path)]
    for name, path in sorted(files.items()):
        parts += [name.encode(), _file_sha(path)]
    key = _sha(*parts)
    final = cache / f"initramfs-{version}-{key}.cpio"
    if final.is_file():
        return final
    cpio = require_tool("cpio", "packs the guest initramfs", "cpio")
    say(f"building the initramfs ({len(modules)} modules, busybox, guest agent)")
    with tempfile.TemporaryDirectory(prefix=".initramfs-", dir=cache) as tmpdir:
        root = Path(tmpdir) / "root"
        for sub in ("bin", "dev", "proc", "sys", "mnt", "stockade", "lib/modules"):
            (root / sub).mkdir(parents=True)
        shutil.copy2(busybox, root / "bin" / "busybox")
        applets = subprocess.run(
            [str(busybox), "--list"], capture_output=True, text=True, check=True
        ).stdout.split()
        for applet in applets:
            if applet != "busybox" and "/" not in applet:
                (root / "bin" / applet).symlink_to("busybox")
        for name, source in files.items():
            shutil.copy2(source, root / "stockade" / name)
        _precompile(root / "stockade" / "agent.py")
        # The launcher is the guest's main script, whose bytecode Python never caches.
        _precompile(root / "stockade" / "launcher.py")
        (root / "stockade" / "init").chmod(0o755)
        (root / "init").symlink_to("stockade/init")
        moddir = root / "lib" / "modules" / version
        order: list[str] = []
        for path in [*modules, *extra]:
            rel = path.relative_to(Path("/lib/modules") / version)
            (moddir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, moddir / rel)
            if path in modules:
                order.append(str(rel))
        (moddir / "order").write_text("".join(f"{line}\n" for line in order))
        (root / "stockade" / "kernel-version").write_text(version + "\n")
        names = sorted(
            str(p.relative_to(root)) for p in root.rglob("*") if p != root
        )  # parents sort before their children
        tmp = cache / f".{final.name}.tmp-{os.getpid()}"
        with tmp.open("wb") as out:
            proc = subprocess.run(
                [cpio, "--quiet", "-o", "-H", "newc", "-R", "0:0"],
                input="\n".join(names).encode(),
                stdout=out,
                stderr=subprocess.PIPE,
                cwd=root,
                check=False,
            )
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise ImageBuildError(
                f"cpio failed packing the initramfs: {proc.stderr.decode(errors='replace')}",
                fix="check free space in the image cache",
            )
        _publish(tmp, final)
    return final


def _root_image(cache: Path, tree: Path, rootfs_key: str, say: Progress) -> Path:
    final = cache / f"root-{rootfs_key}-v{VM_RECIPE_VERSION}.erofs"
    if final.is_file():
        return final
    mkfs = require_tool("mkfs.erofs", "packs the guest root filesystem", "erofs-utils")
    say("packing the root filesystem as erofs (lz4)")
    tmp = cache / f".{final.name}.tmp-{os.getpid()}"
    try:
        # lz4 only: the guest kernel has no LZMA erofs support.
        proc = subprocess.run(
            [mkfs, "-zlz4", "-T0", *(["--all-root"] if os.geteuid() != 0 else []), str(tmp),
             str(tree)],
            capture_output=True,
            check=False,
            timeout=600,
        )  # fmt: skip
        if proc.returncode != 0:
            raise ImageBuildError(
                f"mkfs.erofs failed (exit {proc.returncode}): "
                f"{proc.stderr.decode(errors='replace')[-1000:]}",
                fix="check free space in the image cache",
            )
        _publish(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


#: Unused kernels, initramfs images and snapshots are removed after this long: another
#: stockade version (another checkout, a virtualenv) may still be using them.
PRUNE_AFTER = 7 * 24 * 3600


def _stale(path: Path, now: float) -> bool:
    try:
        return now - path.stat().st_mtime > PRUNE_AFTER
    except OSError:
        return False


def _prune(cache: Path, *, keep: set[str], image_key: str) -> None:
    """Drop kernels, initramfs images and snapshots no build has used for ``PRUNE_AFTER``.

    Every ``ensure_vm_image`` marks the files it uses as fresh, so what another stockade
    version still uses stays. Root images of other profiles stay (they are other recipes).
    A VM still running from a removed file keeps it open, so this never breaks a sandbox.
    """
    now = time.time()
    for path in [*cache.glob("vmlinux-*"), *cache.glob("initramfs-*")]:
        if path.name not in keep and _stale(path, now):
            with contextlib.suppress(OSError):
                path.unlink()
    snapshots = cache / "snapshots"
    if snapshots.is_dir():
        keys = {image_key}
        for current in cache.glob("current-*.json"):
            with contextlib.suppress(OSError, ValueError):
                keys.add(str(json.loads(current.read_text())["key"]))
        for entry in snapshots.iterdir():
            if entry.name not in keys and _stale(entry, now):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


def _vm_key(kernel: Path, initrd: Path, rootfs: Path) -> str:
    return _sha(kernel.name.encode(), initrd.name.encode(), rootfs.name.encode())


def ensure_vm_image(
    profile: str = "base", *, progress: Progress | None = None, rebuild: bool = False
) -> VmImage:
    """Build (or find) the kernel, initramfs and root image for ``profile`` (blocking)."""
    say = progress or (lambda _line: None)
    started = time.monotonic()
    rootfs = ensure_rootfs(profile, progress=say, rebuild=rebuild)
    cache = image_cache_dir() / "vm"
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / ".build.lock"):
        kernel, version = _kernel(cache, say)
        initrd = _initramfs(cache, version, say)
        root = _root_image(cache, rootfs.tree, rootfs.key, say)
    image = VmImage(
        profile=profile,
        key=_vm_key(kernel, initrd, root),
        kernel=kernel,
        kernel_version=version,
        initrd=initrd,
        rootfs=root,
    )
    for used in (kernel, initrd, root, cache / "snapshots" / image.key):
        with contextlib.suppress(OSError):
            os.utime(used)  # fresh: not pruned while this version is in use
    _prune(cache, keep={kernel.name, initrd.name}, image_key=image.key)
    (cache / f"current-{profile}.json").write_text(
        json.dumps({k: str(v) for k, v in image.__dict__.items()}, indent=1) + "\n"
    )
    say(f"microVM image {profile} ready ({image.key}) in {time.monotonic() - started:.1f} s")
    return image


def find_vm_image(profile: str = "base") -> VmImage | None:
    """The built image for ``profile`` if it is complete and current, else None (no build).

    Cheap enough for a probe: the initramfs key is recomputed (the guest agent may have
    changed), the rootfs is looked up without building.
    """
    rootfs = find_rootfs(profile)
    if rootfs is None:
        return None
    cache = image_cache_dir() / "vm"
    try:
        bzimage, version = find_host_kernel()
    except ImageBuildError:
        return None
    kernels = sorted(cache.glob(f"vmlinux-{version}-*"))
    root = cache / f"root-{rootfs.key}-v{VM_RECIPE_VERSION}.erofs"
    if not kernels or not root.is_file():
        return None
    try:
        with _locked(cache / ".build.lock"):
            kernel, _ = _kernel(cache, lambda _l: None)
            initrd = _initramfs(cache, version, lambda _l: None)
    except (ImageBuildError, OSError, subprocess.SubprocessError):
        return None
    del bzimage
    return VmImage(
        profile=profile,
        key=_vm_key(kernel, initrd, root),
        kernel=kernel,
        kernel_version=version,
        initrd=initrd,
        rootfs=root,
    )
