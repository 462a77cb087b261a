"""Pure logic of the microVM backend: QEMU argv, image recipe helpers, guest config, the
upper-layer round trip (guest packer -> host importer), and `auto` never picking TCG."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import os
import stat
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

from stockade._errors import WorkspaceError
from stockade.backends.base import Availability
from stockade.backends.microvm.backend import vm_size
from stockade.backends.microvm.driver import AgentTransport, DiskSpec, VmSpec
from stockade.backends.microvm.guest_config import build_guest_config, disk_bucket
from stockade.backends.microvm.qemu import build_qemu_argv, host_tsc_khz
from stockade.backends.microvm.upper import OPAQUE_XATTR, import_upper
from stockade.images.rootfs import ImageBuildError
from stockade.images.vm import extract_vmlinux, parse_show_depends


def _spec(tmp_path: Path, *, disks: int = 1, kind: str = "virtio-serial") -> VmSpec:
    all_disks = (
        DiskSpec(tmp_path / "root.erofs", True, "root"),
        DiskSpec(tmp_path / "ws.ext4", False, "workspace"),
    )
    return VmSpec(
        kernel=tmp_path / "vmlinux",
        initrd=tmp_path / "initrd.cpio",
        disks=all_disks[:disks],
        vcpus=2,
        memory_mib=384,
        cmdline="stockade.root=vda",
        workdir=tmp_path,
        agent=AgentTransport(kind, tmp_path / "agent.sock"),  # type: ignore[arg-type]
    )


def _arg_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_qemu_argv_tcg(tmp_path: Path) -> None:
    argv = build_qemu_argv(_spec(tmp_path, disks=2), qemu="qemu", accel="tcg", tsc_khz=2596122)
    assert _arg_after(argv, "-M") == ["microvm,accel=tcg"]
    assert _arg_after(argv, "-smp") == ["2"] and _arg_after(argv, "-m") == ["384M"]
    append = _arg_after(argv, "-append")[0].split()
    assert "tsc_early_khz=2596122" in append
    assert "acpi=off" not in append  # virtio-mmio is discovered through ACPI on microvm
    assert append[-1] == "stockade.root=vda"
    assert "-nodefaults" in argv and "-no-reboot" in argv and "-incoming" not in argv
    assert "-netdev" not in argv and "-nic" not in argv  # no NIC, ever
    chardev = _arg_after(argv, "-chardev")[0]
    assert chardev == f"socket,path={tmp_path / 'agent.sock'},id=agent0"  # we listen
    assert "server" not in chardev
    drives = _arg_after(argv, "-drive")
    assert drives[0].endswith(",readonly=on") and "id=root" in drives[0]
    assert drives[1].endswith(",cache=unsafe") and "id=workspace" in drives[1]
    assert "virtserialport,chardev=agent0,name=agent" in _arg_after(argv, "-device")


def test_qemu_argv_restore_and_kvm(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    cold = build_qemu_argv(spec, qemu="qemu", accel="kvm", tsc_khz=2596122)
    warm = build_qemu_argv(spec, qemu="qemu", accel="kvm", tsc_khz=2596122, incoming=True)
    assert warm[: len(cold)] == cold and warm[len(cold) :] == ["-incoming", "defer"]
    assert "tsc_early_khz" not in _arg_after(cold, "-append")[0]
    assert _arg_after(cold, "-cpu") == ["host"]


def test_qemu_argv_memory_file(tmp_path: Path) -> None:
    # The snapshot source writes its RAM into a shared file; a restore maps that file
    # privately (copy-on-write), under the RAM block name plain ``-m`` gives it.
    from stockade.backends.microvm.boot import restored_spec, snapshot_memory

    spec = _spec(tmp_path)
    source = dataclasses.replace(
        spec, options={"memory_file": str(tmp_path / "ram"), "memory_share": "on"}
    )
    argv = build_qemu_argv(source, qemu="qemu", accel="tcg", tsc_khz=None)
    assert _arg_after(argv, "-M") == ["microvm,accel=tcg,memory-backend=microvm.ram"]
    assert _arg_after(argv, "-m") == ["384M"]
    assert _arg_after(argv, "-object") == [
        f"memory-backend-file,id=microvm.ram,size=384M,mem-path={tmp_path / 'ram'},share=on"
    ]
    snapshot = tmp_path / "key.mig"
    restored = restored_spec(spec, snapshot)
    assert restored.options["ignore_shared"] == "on"
    argv = build_qemu_argv(restored, qemu="qemu", accel="tcg", tsc_khz=None, incoming=True)
    (backend,) = _arg_after(argv, "-object")
    assert backend.endswith(f"mem-path={snapshot_memory(snapshot)},share=off")
    assert "-object" not in build_qemu_argv(spec, qemu="qemu", accel="tcg", tsc_khz=None)


def test_qemu_argv_vsock(tmp_path: Path) -> None:
    argv = build_qemu_argv(_spec(tmp_path, kind="vsock"), qemu="q", accel="kvm", tsc_khz=None)
    assert "vhost-vsock-device,guest-cid=3" in _arg_after(argv, "-device")
    assert "-chardev" not in argv


def test_host_tsc_khz() -> None:
    assert host_tsc_khz("processor\t: 0\ncpu MHz\t\t: 2596.122\n") == 2596122
    assert host_tsc_khz("processor\t: 0\n") is None


def test_parse_show_depends() -> None:
    text = (
        "insmod /lib/modules/6.1/kernel/drivers/virtio/virtio_ring.ko \n"
        "insmod /lib/modules/6.1/kernel/drivers/virtio/virtio.ko opt=1\n"
        "builtin ext4\n"
    )
    assert parse_show_depends(text) == [
        Path("/lib/modules/6.1/kernel/drivers/virtio/virtio_ring.ko"),
        Path("/lib/modules/6.1/kernel/drivers/virtio/virtio.ko"),
    ]


def test_extract_vmlinux() -> None:
    elf = b"\x7fELF" + b"\0" * 60
    assert extract_vmlinux(elf) == elf
    with pytest.raises(ImageBuildError, match="LZ4"):
        extract_vmlinux(b"MZ not a kernel")


def test_vm_size_anddisk_bucket() -> None:
    class Limits:
        cpus = 1.5
        memory_bytes = 300 * 1024 * 1024

    class Policy:
        limits = Limits()

    assert vm_size(Policy()) == (2, 300)
    Limits.cpus = None  # type: ignore[assignment]
    Limits.memory_bytes = None  # type: ignore[assignment]
    assert vm_size(Policy()) == (1, 512)
    assert disk_bucket(1) == 256 * 1024 * 1024
    assert disk_bucket(200 * 1024 * 1024) == 512 * 1024 * 1024


def test_guest_config_carries_egress_and_env(tmp_path: Path, project: Path) -> None:
    from stockade.backends.base import LaunchSpec
    from stockade.config import load_config
    from stockade.egress.runtime import EgressLaunch
    from stockade.policy import compile_policy

    policy = compile_policy(load_config(project))
    bundle = tmp_path / "ca.pem"
    bundle.write_text("CA")
    egress = EgressLaunch(
        proxy_port=3128,
        forwards=((10022, "git.example:22"),),
        env={"HTTPS_PROXY": "http://127.0.0.1:3128"},
        local_names=("git.example",),
        files=((str(bundle), "/etc/ssl/certs/stockade.pem"),),
    )
    spec = LaunchSpec(
        sandbox_id="id", name="n", policy=policy, state_dir=tmp_path, workspace=None, egress=egress
    )
    config = build_guest_config(spec, workspace=None, now_ns=123, seed=b"s" * 64)
    assert config["time_ns"] == 123
    assert config["env"]["HTTPS_PROXY"] == "http://127.0.0.1:3128"
    assert "AWS_SECRET_ACCESS_KEY" not in config["env"]
    args = config["args"]
    assert args[args.index("--net-proxy") + 1] == "3128"
    assert args[args.index("--net-forward") + 1] == "10022=git.example:22"
    files = {path: data for path, data, _mode in config["files"]}
    assert "/etc/ssl/certs/stockade.pem" in files
    import base64

    assert b"git.example" in base64.b64decode(files["/etc/hosts"])
    assert args[args.index("--workspace") + 1] == config["env"]["HOME"]


def _wsync() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "src/stockade/images/guest/wsync.py"
    spec = importlib.util.spec_from_file_location("wsync", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for trusted.* xattrs and mknod")
def test_upper_round_trip(tmp_path: Path) -> None:
    guest_upper = tmp_path / "guest"
    (guest_upper / "dir" / "sub").mkdir(parents=True)
    (guest_upper / "dir" / "sub" / "f.txt").write_text("data")
    (guest_upper / "exe").write_text("#!/bin/sh\n")
    (guest_upper / "exe").chmod(0o755)
    os.symlink("dir/sub/f.txt", guest_upper / "link")
    os.mknod(guest_upper / "gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.mkfifo(guest_upper / "fifo")
    os.setxattr(guest_upper / "dir", "trusted.overlay.opaque", b"y")
    out = tmp_path / "export.tar"
    assert _wsync().pack(str(guest_upper), str(out)) == 6

    host_upper = tmp_path / "upper"
    host_upper.mkdir()
    (host_upper / "stale").write_text("from an earlier sync")
    with out.open("rb") as f:
        assert import_upper(f, host_upper) == 6
    assert not (host_upper / "stale").exists()
    assert (host_upper / "dir" / "sub" / "f.txt").read_text() == "data"
    assert os.stat(host_upper / "exe").st_mode & 0o777 == 0o755
    assert os.readlink(host_upper / "link") == "dir/sub/f.txt"
    gone = os.lstat(host_upper / "gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert os.getxattr(host_upper / "dir", OPAQUE_XATTR) == b"y"
    assert not os.path.lexists(host_upper / "fifo")


def _tar(*members: tarfile.TarInfo) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isreg() else None)
    buf.seek(0)
    return buf


def _member(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


@pytest.mark.parametrize(
    "members",
    [
        [_member("../escape", size=1)],
        [_member("/abs", size=1)],
        [_member("a/../../b", size=1)],
        [_member("dev", tarfile.CHRTYPE, devmajor=1, devminor=3)],
        [_member("blk", tarfile.BLKTYPE)],
        [_member("hard", tarfile.LNKTYPE, linkname="x")],
        [_member("l", tarfile.SYMTYPE, linkname="/etc"), _member("l/passwd", size=1)],
        [_member("same", size=1), _member("same", size=1)],
    ],
)
def test_upper_import_refuses_hostile_archives(
    tmp_path: Path, members: list[tarfile.TarInfo]
) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "keep").write_text("kept")
    with pytest.raises(WorkspaceError):
        import_upper(_tar(*members), upper)
    assert (upper / "keep").read_text() == "kept"  # nothing was replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upper"]  # no leftovers


def test_upper_import_never_sets_setuid(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    import_upper(_tar(_member("suid", size=1, mode=0o4755)), upper)
    assert os.stat(upper / "suid").st_mode & 0o7777 == 0o755


def test_auto_skips_a_backend_that_works_only_when_asked(
    monkeypatch: pytest.MonkeyPatch, project: Path
) -> None:
    from stockade.backends import registry
    from stockade.config import load_config
    from stockade.policy import compile_policy

    real = registry.probe

    def fake_probe(name: str) -> Availability:
        if name == "microvm":
            return Availability(True, "QEMU microvm under TCG emulation", auto=False)
        return real(name)

    monkeypatch.setattr(registry, "probe", fake_probe)
    policy = compile_policy(load_config(project))
    assert policy.backend == "auto"
    try:
        chosen = registry.select_backend(policy)
    except Exception as exc:  # no other backend here: the error names why microvm was skipped
        assert "only when asked" in str(exc)
    else:
        assert chosen.name != "microvm"


def test_microvm_config_and_runtime_env(monkeypatch: pytest.MonkeyPatch, project: Path) -> None:
    from stockade.config import load_config
    from stockade.policy import compile_policy

    for name in ("STOCKADE_MICROVM_ACCEL", "STOCKADE_IMAGE_DIR", "STOCKADE_FIRECRACKER"):
        monkeypatch.setenv(name, "x")  # runtime settings, not configuration keys
    policy = compile_policy(load_config(project))
    assert (policy.microvm.user, policy.microvm.image) == ("user", "base")
    root = compile_policy(load_config(project, overrides={"microvm.user": "root"}))
    assert root.microvm.user == "root"
    from stockade._errors import ConfigError

    with pytest.raises(ConfigError):
        load_config(project, overrides={"microvm.user": "admin"})


def test_guest_config_user_and_limits(tmp_path: Path, project: Path) -> None:
    from stockade.backends.base import LaunchSpec
    from stockade.config import load_config
    from stockade.policy import compile_policy

    policy = compile_policy(
        load_config(project, overrides={"limits.pids": 64, "limits.disk": "64M"})
    )
    spec = LaunchSpec(sandbox_id="i", name="n", policy=policy, state_dir=tmp_path, workspace=None)
    config = build_guest_config(spec, workspace=None, now_ns=1, seed=b"s")
    assert config["user"] == [1000, 1000]
    assert config["disk_bytes"] == 64 * 1024 * 1024
    assert config["args"][config["args"].index("--rlimit", 4) + 1] == "nproc=64"
    import base64

    files = {path: base64.b64decode(data) for path, data, _ in config["files"]}
    assert b"user:x:1000:1000:" in files["/etc/passwd"]


def test_tree_entries_for_a_streamed_workspace(tmp_path: Path) -> None:
    # What the guest gets instead of a tar: parents first, modes and links kept, content in
    # base64, special files left out (as the tar of the other backends leaves them out).
    import base64
    import os

    from stockade.backends.microvm.guest_config import tree_entries

    root = tmp_path / "tree"
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "e" / "run.sh").write_text("#!/bin/sh\n")
    (root / "d" / "e" / "run.sh").chmod(0o755)
    (root / "a.txt").write_bytes(b"\x00\xffdata")
    os.link(root / "a.txt", root / "b.txt")
    os.symlink("d/e/run.sh", root / "link")
    os.mkfifo(root / "fifo")
    entries = {e[1]: e for e in tree_entries(root)}
    assert list(entries) == ["a.txt", "b.txt", "d", "link", "d/e", "d/e/run.sh"]
    assert base64.b64decode(entries["a.txt"][4]) == b"\x00\xffdata"
    assert entries["b.txt"][0] == "h" and entries["b.txt"][4] == "a.txt"
    assert entries["link"][0] == "l" and entries["link"][4] == "d/e/run.sh"
    assert entries["d"][0] == entries["d/e"][0] == "d"
    assert entries["d/e/run.sh"][2] == 0o755
