"""MicroVM backend benchmarks (QEMU microvm; TCG on this host), baselines from the same run.

    python bench/bench_microvm.py [--runs N] [--concurrent 8] [--json out.json]

Prints medians and ratios:
  1. cold boot to agent ready (SDK create, snapshots off)  vs  raw QEMU boot of the same
     kernel, same machine and args, to a trivial init that powers off      (goal <= 1.3x)
  2. restore from snapshot to first exec (SDK create + `true`)  vs  1.  (goal < 250 ms, >10x)
     plus the VMM restore alone (QEMU -incoming + cont; the guest RAM is the snapshot's
     memory file, mapped copy-on-write)
     and from a warm pool (VMs restored and warmed in advance: `WarmPool`)
     and forks of a named snapshot of a running sandbox (full RAM stream, then a reseed)
  3. N sandboxes created at once from the snapshot: time until all ran `true`
  4. host memory per idle VM: RSS and PSS of the QEMU process, cold-booted and restored
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import anyio
from _common import median_ms

from stockade import AsyncSandbox
from stockade.backends.microvm.boot import restored_spec, snapshot_key, snapshot_path
from stockade.backends.microvm.driver import AgentTransport, DiskSpec, VmSpec
from stockade.backends.microvm.qemu import QemuDriver, build_qemu_argv, host_tsc_khz, qemu_binary
from stockade.images.vm import ensure_vm_image

TRIVIAL_INIT = "#!/bin/busybox sh\n/bin/busybox poweroff -f\n"


def mem_kib(pid: int) -> tuple[int, int]:
    rss = pss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("Pss:"):
            pss = int(line.split()[1])
    return rss, pss


def cpu_ms(pid: int) -> float:
    """User + system CPU time of a process so far (less load-sensitive than wall time)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def children_cpu_ms() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * 1000


def trivial_initrd(work: Path) -> Path:
    """An initramfs with only a static busybox and an init that powers off at once."""
    root = work / "trivial"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", root / "bin" / "busybox")
    (root / "init").write_text(TRIVIAL_INIT)
    (root / "init").chmod(0o755)
    out = work / "trivial.cpio"
    names = "\n".join(["bin", "bin/busybox", "init"])
    with out.open("wb") as f:
        subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
            input=names.encode(), stdout=f, cwd=root, check=True,
        )  # fmt: skip
    return out


def raw_boot(
    kernel: Path, initrd: Path, work: Path, runs: int, memory_mib: int
) -> tuple[list[float], list[float]]:
    """Same QEMU machine and kernel args as the backend, no devices, trivial init."""
    spec = VmSpec(
        kernel=kernel,
        initrd=initrd,
        disks=(),
        vcpus=1,
        memory_mib=memory_mib,
        cmdline="",
        workdir=work,
        agent=AgentTransport("vsock", work / "unused.sock"),
    )
    qemu = qemu_binary()
    assert qemu is not None
    argv = build_qemu_argv(spec, qemu=qemu, accel="tcg", tsc_khz=host_tsc_khz())
    # No vsock device (this host has none) and no QMP: a bare boot.
    drop = {"vhost-vsock-device,guest-cid=3"}
    cleaned: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in ("-device", "-qmp") and (argv[i + 1] in drop or arg == "-qmp"):
            skip = True
            continue
        cleaned.append(arg)
    out, cpu = [], []
    for _ in range(runs):
        c = children_cpu_ms()
        t = time.perf_counter()
        subprocess.run(cleaned, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out.append(time.perf_counter() - t)
        cpu.append(children_cpu_ms() - c)
    return out, cpu


def translated_blocks(sb: AsyncSandbox) -> int:
    """TCG translation blocks this QEMU has made so far (HMP ``info jit``): under emulation,
    what a restored VM spends most of its time on is translating code again."""
    vm = sb._launched.vm  # type: ignore[union-attr]
    text = vm.qmp.command("human-monitor-command", **{"command-line": "info jit"}) or ""
    for line in text.splitlines():
        if line.strip().startswith("TB count"):
            return int(line.split()[-1])
    return 0


TBS: dict[str, list[int]] = {"restore": [], "pool": []}


async def create_and_exec(
    project: Path, runs: int
) -> tuple[list[float], list[float], list[bool], list[float]]:
    """(create -> agent ready, create -> first `true` done, restored?, QEMU CPU ms) per run."""
    ready, first, restored, cpu = [], [], [], []
    for _ in range(runs):
        t = time.perf_counter()
        sb = await AsyncSandbox.create(project_dir=project, backend="microvm")
        ready.append(time.perf_counter() - t)
        await sb.commands.run(["true"])
        first.append(time.perf_counter() - t)
        cpu.append(cpu_ms(sb._launched.vm.pid))  # type: ignore[attr-defined]
        restored.append(bool(getattr(sb._launched, "restored", False)))
        if restored[-1]:
            TBS["restore"].append(translated_blocks(sb))
        await sb.aclose()
    return ready, first, restored, cpu


async def idle_memory(project: Path) -> tuple[int, int]:
    async with await AsyncSandbox.create(project_dir=project, backend="microvm") as sb:
        await sb.commands.run(["true"])
        await anyio.sleep(2)
        return mem_kib(sb._launched.vm.pid)  # type: ignore[union-attr]


def bench_spec(image: object, wd: Path, memory_mib: int = 2048) -> VmSpec:
    """The driver-only VM: boot and restore must use the very same spec (same argv)."""
    return VmSpec(
        kernel=image.kernel,  # type: ignore[attr-defined]
        initrd=image.initrd,  # type: ignore[attr-defined]
        disks=(DiskSpec(image.rootfs, True, "root"),),  # type: ignore[attr-defined]
        vcpus=1,
        memory_mib=memory_mib,
        cmdline="stockade.root=vda stockade.agent=serial",
        workdir=wd,
        agent=AgentTransport("virtio-serial", wd / "agent.sock"),
    )


async def vmm_restore(image: object, work: Path, snapshot: Path, runs: int) -> list[float]:
    """Driver only: QEMU -incoming + cont until the channel is connected and answers."""
    out = []
    for i in range(runs):
        wd = work / f"restore-{i}"
        wd.mkdir()
        spec = restored_spec(bench_spec(image, wd), snapshot)
        t = time.perf_counter()
        vm = await QemuDriver("tcg").restore(spec, snapshot)
        out.append(time.perf_counter() - t)
        await vm.stop(0)
    return out


async def from_pool(project: Path, runs: int) -> tuple[list[float], list[float]]:
    """Sandboxes from a warm pool of 2 restored, warmed VMs (refilled between runs)."""
    from stockade.backends.microvm.pool import WarmPool

    ready, first = [], []
    async with WarmPool(size=2) as pool:
        for _ in range(runs):
            with anyio.fail_after(120):
                while pool.ready_count() < 2:
                    await anyio.sleep(0.05)
            t = time.perf_counter()
            sb = await pool.create(project_dir=project)
            ready.append(time.perf_counter() - t)
            await sb.commands.run(["true"])
            first.append(time.perf_counter() - t)
            TBS["pool"].append(translated_blocks(sb))
            await sb.aclose()
    return ready, first


async def forks(project: Path, runs: int) -> tuple[list[float], list[float]]:
    """Sandboxes forked from a named snapshot of a running one (``fork NAME``): to agent
    ready (the running agent resets the clock and reseeds entropy) and to a first `true`."""
    from stockade.backends.microvm.snapshots import fork_sandbox, snapshot_sandbox

    ready, first = [], []
    async with await AsyncSandbox.create(project_dir=project, backend="microvm") as source:
        await source.commands.run(["sh", "-c", "echo forked > state.txt"])
        await snapshot_sandbox(source, "bench")
        for _ in range(runs):
            t = time.perf_counter()
            sb = await fork_sandbox(source, tag="bench")
            ready.append(time.perf_counter() - t)
            await sb.commands.run(["true"])
            first.append(time.perf_counter() - t)
            await sb.aclose()
    return ready, first


async def concurrent(project: Path, count: int) -> tuple[float, list[float], list[int]]:
    sandboxes: list[AsyncSandbox] = []
    each: list[float] = []
    t = time.perf_counter()
    try:
        async with anyio.create_task_group() as tg:

            async def one() -> None:
                sb = await AsyncSandbox.create(project_dir=project, backend="microvm")
                sandboxes.append(sb)
                await sb.commands.run(["true"])
                each.append(time.perf_counter() - t)

            for _ in range(count):
                tg.start_soon(one)
        elapsed = time.perf_counter() - t
        pss = [mem_kib(sb._launched.vm.pid)[1] for sb in sandboxes]  # type: ignore[union-attr]
        return elapsed, each, pss
    finally:
        with anyio.CancelScope(shield=True):
            for sb in sandboxes:
                await sb.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    os.environ["STOCKADE_MICROVM_ACCEL"] = os.environ.get("STOCKADE_MICROVM_ACCEL", "tcg")

    work = Path(tempfile.mkdtemp(prefix="stockade-bench-microvm-"))
    os.environ.setdefault("STOCKADE_STATE_DIR", str(work / "state"))
    project = work / "project"
    project.mkdir()
    (project / "README.md").write_text("bench\n")
    image = ensure_vm_image("base")
    results: dict[str, object] = {"runs": args.runs}

    # The sandbox default is a 2 GiB VM; the raw boot gets the same size.
    print(f"load average at start: {os.getloadavg()}")
    raw, raw_cpu = raw_boot(image.kernel, trivial_initrd(work), work, args.runs, 2048)
    os.environ["STOCKADE_MICROVM_SNAPSHOTS"] = "0"
    cold_ready, cold_first, _, cold_cpu = anyio.run(create_and_exec, project, args.runs)
    cold_mem = anyio.run(idle_memory, project)
    os.environ["STOCKADE_MICROVM_SNAPSHOTS"] = "1"
    anyio.run(create_and_exec, project, 1)  # makes sure the snapshot exists
    warm_ready, warm_first, restored, warm_cpu = anyio.run(create_and_exec, project, args.runs * 2)
    assert all(restored), "sandboxes were not restored from the snapshot"
    warm_mem = anyio.run(idle_memory, project)
    # The driver alone, from the image snapshot the sandboxes above were restored from.
    snapshot = snapshot_path(image, snapshot_key(image, "qemu/tcg", 1, 2048, 0))
    vmm = anyio.run(vmm_restore, image, work, snapshot, args.runs)
    total, each, pss = anyio.run(concurrent, project, args.concurrent)
    pool_ready, pool_first = anyio.run(from_pool, project, args.runs * 2)
    fork_ready, fork_first = anyio.run(forks, project, args.runs)

    rows = [
        ("cold boot to agent ready (SDK create)", median_ms(cold_ready),
         "raw qemu boot, trivial init", median_ms(raw), "<= 1.3x"),
        ("cold boot to first exec done", median_ms(cold_first),
         "raw qemu boot, trivial init", median_ms(raw), "-"),
        ("restore to agent ready (SDK create)", median_ms(warm_ready),
         "cold boot to agent ready", median_ms(cold_ready), "-"),
        ("restore to first exec done", median_ms(warm_first),
         "cold boot to first exec done", median_ms(cold_first), "< 250 ms, > 10x"),
        ("warm pool to agent ready (pool.create)", median_ms(pool_ready),
         "cold boot to agent ready", median_ms(cold_ready), "-"),
        ("warm pool to first exec done", median_ms(pool_first),
         "cold boot to first exec done", median_ms(cold_first), "< 250 ms, > 10x"),
        ("fork of a named snapshot to agent ready", median_ms(fork_ready),
         "cold boot to agent ready", median_ms(cold_ready), "-"),
        ("fork of a named snapshot to first exec", median_ms(fork_first),
         "cold boot to first exec done", median_ms(cold_first), "-"),
        ("VMM restore only (-incoming, cont)", median_ms(vmm),
         "raw qemu boot, trivial init", median_ms(raw), "-"),
    ]  # fmt: skip
    print(f"{'measurement':<40} {'median':>9}   {'baseline':<30} {'median':>9} {'ratio':>7}  goal")
    for name, value, base_name, base, goal in rows:
        print(
            f"{name:<40} {value:>7.0f}ms   {base_name:<30} {base:>7.0f}ms "
            f"{value / base:>6.2f}x  {goal}"
        )
    print(
        f"\nQEMU CPU time (user+sys) medians: raw boot to poweroff {statistics.median(raw_cpu):.0f}"
        f" ms; cold boot to first exec {statistics.median(cold_cpu):.0f} ms "
        f"({statistics.median(cold_cpu) / statistics.median(raw_cpu):.2f}x raw); restore to "
        f"first exec {statistics.median(warm_cpu):.0f} ms "
        f"({statistics.median(cold_cpu) / statistics.median(warm_cpu):.1f}x less than cold)"
    )
    print(
        "TCG translation blocks made by QEMU up to the first exec done (medians): restored "
        f"{statistics.median(TBS['restore']):.0f}, warm pool {statistics.median(TBS['pool']):.0f}"
        " (the pool's include its warm-up before the sandbox took the VM)"
    )
    print(f"load average at end: {os.getloadavg()}")
    print(
        f"\n{args.concurrent} sandboxes created at once from the snapshot: all ran `true` after "
        f"{total * 1000:.0f} ms (per sandbox median {median_ms(each):.0f} ms); "
        f"QEMU PSS median {statistics.median(pss) / 1024:.0f} MiB"
    )
    print(
        f"idle VM host memory (QEMU process): cold-booted RSS {cold_mem[0] / 1024:.0f} MiB / "
        f"PSS {cold_mem[1] / 1024:.0f} MiB; restored RSS {warm_mem[0] / 1024:.0f} MiB / "
        f"PSS {warm_mem[1] / 1024:.0f} MiB (2 GiB guest, 1 vCPU)"
    )
    print(
        "snapshot files (device state; guest RAM file allocated): "
        + ", ".join(
            f"{p.stat().st_size / 1e3:.0f} kB + "
            f"{p.with_suffix('.mem').stat().st_blocks * 512 / 1e6:.0f} MB"
            for p in [snapshot]
        )
    )
    results.update(
        raw_ms=raw, raw_cpu_ms=raw_cpu, cold_cpu_ms=cold_cpu, warm_cpu_ms=warm_cpu,
        cold_ready=cold_ready, cold_first=cold_first, warm_ready=warm_ready,
        warm_first=warm_first, vmm_restore=vmm, concurrent_total=total, concurrent_each=each,
        concurrent_pss_kib=pss, cold_mem_kib=cold_mem, warm_mem_kib=warm_mem,
        pool_ready=pool_ready, pool_first=pool_first, fork_ready=fork_ready,
        fork_first=fork_first,
    )  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
