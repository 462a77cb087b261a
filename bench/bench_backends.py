"""Per-backend start cost and exec latency, each against the raw tool measured in the same run.

    python bench/bench_backends.py [--runs N] [--only gvisor,container/runc] [--json out.json]

For every backend that runs here (the registry's, with the container engines one by one):
  1. SDK create + first exec `true` + destroy (copy-on-write workspace, default limits)
     vs the raw tool starting the same kind of root (host /usr read-only) and running
     `python3 -S -c pass` to the end: `runsc run`, `runc run`, `crun run`,
     `docker run --rm`, `podman run --rm`, `bwrap`. Goal: within 1.5x of the raw tool.
  2. warm exec round trip of `true` in a running sandbox vs a plain subprocess `true`.
For runc, crun and runsc also: the raw tool on the very bundle stockade writes (its hardening
included), running `python3 -S -c pass`, to tell the hardening's cost from stockade's own.
Docker and Podman need their API: set DOCKER_HOST / CONTAINER_HOST (e.g. from
`.ci/dockerd.sh start DIR` and `.ci/podman.sh start DIR`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from _common import PY_PASS, RAW_BWRAP, median_ms, sdk_lifecycle, time_cmd, warm_exec

from stockade import AsyncSandbox


def raw_bundle(work: Path) -> Path:
    """A minimal OCI bundle: host /usr read-only, fresh namespaces, `python3 -S -c pass`."""
    from stockade.backends.oci_bundle import host_rootfs

    bundle = work / "raw-bundle"
    bundle.mkdir(exist_ok=True)
    rootfs = host_rootfs(bundle)
    config = {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": PY_PASS,
                    "cwd": "/", "env": ["PATH=/usr/bin"], "noNewPrivileges": True,
                    "capabilities": {}},
        "root": {"path": str(rootfs.path), "readonly": True},
        "mounts": [{"destination": "/usr", "type": "bind", "source": "/usr",
                    "options": ["rbind", "ro"]},
                   {"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "network", "ipc", "uts")]},
    }  # fmt: skip
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def runtime_argv(runtime: str, work: Path) -> list[str]:
    """`<runtime> --root DIR [flags]` as the bench runs it raw (crun behind its cgroup fix)."""
    from stockade.backends.oci_runtime import which

    binary = which(runtime)
    assert binary is not None
    flags = ["--network=none", "--platform=systrap"] if runtime == "runsc" else []
    prefix: list[str] = []
    if runtime == "crun":
        from stockade.backends.container.daemonless import _crun_fix

        fix = _crun_fix()
        if fix:
            prefix = ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
                      f'{fix}; exec "$@"', "sh"]  # fmt: skip
    return [*prefix, binary, "--root", str(work / f"raw-root-{runtime}"), *flags]


def raw_runtime(runtime: str, bundle: Path, runs: int, work: Path) -> list[float]:
    base = runtime_argv(runtime, work)
    out = []
    for i in range(runs):
        argv = [*base, "run", "--bundle", str(bundle), f"raw-{os.getpid()}-{i}"]
        t = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, cwd="/")
        out.append(time.perf_counter() - t)
    return out


async def same_bundle(runtime: str, project: Path, runs: int, work: Path) -> list[float]:
    """The raw tool on the very bundle stockade writes (all its hardening: user namespace,
    seccomp, mounts, masked paths, cgroup limits), running `python3 -S -c pass` instead of
    the agent: what stockade itself adds on top of its hardened container."""
    target = "gvisor" if runtime == "runsc" else f"container/{runtime}"
    async with await AsyncSandbox.create(project_dir=project, **create_kwargs(target)) as sb:
        state = Path(sb._record.dir)  # a live sandbox: every bind source of its bundle exists
        config = json.loads((state / "bundle" / "config.json").read_text())
        config["process"]["args"] = PY_PASS
        config["process"]["cwd"] = "/"
        bundle = work / f"same-bundle-{runtime}"
        bundle.mkdir(exist_ok=True)
        base = runtime_argv(runtime, work)
        cgroup = config["linux"].get("cgroupsPath")
        out = []
        for i in range(runs):
            if cgroup:
                config["linux"]["cgroupsPath"] = f"{cgroup}-raw{i}"
            (bundle / "config.json").write_text(json.dumps(config))
            argv = [*base, "run", "--bundle", str(bundle), f"same-{os.getpid()}-{i}"]
            t = time.perf_counter()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, cwd="/")
            out.append(time.perf_counter() - t)
        return out


def raw_engine(engine: str, runs: int) -> list[float]:
    """`docker run --rm` / `podman run --rm` of the host-view image with /usr bound."""
    from stockade.backends.container.engine import _engine_url, _ensure_image, client_for

    client = client_for(engine)
    try:
        image, _ = _ensure_image(client, "host")
    finally:
        client.close()
    cli = [engine]
    if engine == "podman":
        cli += ["--remote", "--url", _engine_url("podman") or ""]
    argv = [*cli, "run", "--rm", "--network", "none", "--read-only", "--cap-drop", "ALL",
            "-v", "/usr:/usr:ro", image, *PY_PASS]  # fmt: skip
    return time_cmd(argv, runs, cwd="/")


def create_kwargs(target: str) -> dict[str, Any]:
    backend, _, variant = target.partition("/")
    config = {"container.engine": variant} if variant else {}
    return {"backend": backend, "config": config}


def targets() -> list[str]:
    from stockade.backends.registry import BACKENDS, probe, variants

    found = []
    for entry in BACKENDS:
        if not entry.built or not entry.auto:
            continue
        names = [f"{entry.name}/{v}" for v in variants(entry.name)] or [entry.name]
        found += [n for n in names if probe(n).ok]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--only", help="comma-separated backends, e.g. gvisor,container/runc")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="stockade-bench-backends-"))
    os.environ.setdefault("STOCKADE_STATE_DIR", str(work / "state"))
    project = work / "project"
    project.mkdir()
    (project / "README.md").write_text("bench\n")
    bundle = raw_bundle(work)
    runs = args.runs
    chosen = args.only.split(",") if args.only else targets()

    plain_true = median_ms(time_cmd(["true"], runs * 3, cwd="/"))
    results: list[dict[str, Any]] = []
    for target in chosen:
        backend, _, variant = target.partition("/")
        if backend == "gvisor":
            raw_name, raw = "runsc run (systrap)", raw_runtime("runsc", bundle, runs, work)
        elif variant in ("runc", "crun"):
            raw_name, raw = f"{variant} run", raw_runtime(variant, bundle, runs, work)
        elif variant in ("docker", "podman"):
            raw_name, raw = f"{variant} run --rm", raw_engine(variant, runs)
        elif backend == "namespace":
            raw_name, raw = "bwrap", time_cmd(RAW_BWRAP, runs, cwd="/")
        else:
            raw_name, raw = "-", []
        same: list[float] = []
        if backend == "gvisor" or variant in ("runc", "crun"):
            same = anyio.run(same_bundle, "runsc" if backend == "gvisor" else variant, project,
                             runs, work)  # fmt: skip
        # One untimed round first: caches (compiled agent, images, probes) are warm in use.
        anyio.run(partial(sdk_lifecycle, project, 1, **create_kwargs(target)))
        ours = median_ms(anyio.run(partial(sdk_lifecycle, project, runs, **create_kwargs(target))))
        warm = median_ms(anyio.run(partial(warm_exec, project, runs * 3, **create_kwargs(target))))
        raw_ms = median_ms(raw) if raw else float("nan")
        results.append({"backend": target, "lifecycle_ms": ours, "raw": raw_name,
                        "raw_ms": raw_ms, "ratio": ours / raw_ms if raw else float("nan"),
                        "same_bundle_ms": median_ms(same) if same else float("nan"),
                        "warm_exec_ms": warm, "subprocess_true_ms": plain_true})  # fmt: skip

    from rich.console import Console
    from rich.table import Table

    table = Table("backend", "create+exec+destroy", "raw tool", "raw (median)", "ratio",
                  "goal", "raw, same bundle", "ratio", "warm exec `true`", "subprocess `true`",
                  title=f"stockade backends bench ({runs} runs each, medians)")  # fmt: skip
    for r in results:
        table.add_row(
            r["backend"],
            f"{r['lifecycle_ms']:.0f} ms",
            r["raw"],
            f"{r['raw_ms']:.0f} ms",
            f"{r['ratio']:.2f}x",
            "<= 1.5x" if r["raw"] != "-" else "- (bench_microvm.py)",
            f"{r['same_bundle_ms']:.0f} ms",
            f"{r['lifecycle_ms'] / r['same_bundle_ms']:.2f}x",
            f"{r['warm_exec_ms']:.2f} ms",
            f"{r['subprocess_true_ms']:.2f} ms",
        )
    Console(width=170).print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
