"""The daemonless OCI runtime driver of the gvisor and container backends (runsc, runc, crun).

The workspace overlay is mounted in a private mount namespace just before the runtime
starts, so it never appears on the host and vanishes with the sandbox. The bundle it runs
is built by ``oci_bundle.py``.

``OciContainerSandbox`` owns the foreground ``<runtime> run`` process (the agent talks over
its stdio), a watchdog that deletes the container if the owning process dies, and a teardown
that is verified: the runtime no longer knows the container and its cgroup holds no process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process

from stockade._errors import SandboxStartError, SandboxStateError
from stockade.backends._process import ProcessSandbox
from stockade.backends.base import LaunchSpec, Leftover
from stockade.backends.oci_bundle import (
    CONTAINER_PREFIX,
    RootfsView,
    build_config,
    host_rootfs,
    image_rootfs,
    sandbox_cgroup_path,
    write_bundle,
)

__all__ = [
    "OciContainerSandbox",
    "OciRuntime",
    "launch_container",
    "open_runtime_process",
    "overlay_prefix",
    "reap_container",
    "runtime_leftovers",
    "runtime_state_root",
    "start_watchdog",
    "stockade_containers",
    "stop_watchdog",
    "unshare_prefix",
    "wait_gone",
    "which",
]

logger = logging.getLogger(__name__)


def runtime_state_root(runtime: str) -> Path:
    """The runtime's ``--root`` for stockade's containers: one per user, shared by sandboxes.

    Shared (not per sandbox) so that ``<runtime> --root DIR list`` shows every container of
    stockade on this machine, and a leftover can be found by its id.
    """
    uid = os.getuid()
    if uid == 0:
        base = Path("/run/stockade")
    elif os.environ.get("XDG_RUNTIME_DIR"):
        base = Path(os.environ["XDG_RUNTIME_DIR"]) / "stockade"
    else:
        base = Path(f"/tmp/stockade-{uid}")
    root = base / runtime
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    return root


def unshare_prefix() -> list[str]:
    """A private mount namespace; unprivileged, inside a user namespace where we are root.

    The runtime then runs "rootless" in that namespace, and the bundle's id mappings are
    relative to it (the caller is 0 there).
    """
    if os.getuid() == 0:
        return ["unshare", "--mount", "--propagation", "private"]
    return ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"]


def overlay_prefix(
    spec: LaunchSpec, *, extra: str = "", rootfs: RootfsView | None = None
) -> tuple[list[str], Path | None]:
    """``unshare -m sh -c 'mount overlays; exec "$@"'`` and the merged workspace, or ([], None).

    Mounts, in a private mount namespace, the image root's overlay (when ``rootfs`` has a
    shared tree) and the workspace's (mode cow). ``extra`` is shell run there first (crun's
    cgroup fix). The overlays use ``userxattr`` so whiteouts look like the namespace
    backend's (and so it works inside an unprivileged user namespace).
    """
    steps = [extra] if extra else []
    if rootfs is not None and rootfs.lower is not None:
        state = rootfs.path.parent
        steps.append(
            _mount_overlay(rootfs.lower, state / "root-upper", state / "root-work", rootfs.path)
        )
    merged: Path | None = None
    if spec.policy.workspace.mode == "cow" and spec.workspace is not None:
        merged = spec.state_dir / "merged"
        merged.mkdir(exist_ok=True)
        lower_link = spec.state_dir / "lower"
        if not lower_link.is_symlink():
            lower_link.symlink_to(spec.workspace.lower)
        steps.append(_mount_overlay(lower_link, spec.workspace.upper, spec.workspace.work, merged))
        merged = merged.resolve()
    if not steps and os.getuid() == 0:
        return [], None
    script = " && ".join([*steps, 'exec "$@"']) if steps else 'exec "$@"'
    return [*unshare_prefix(), "/bin/sh", "-c", script, "sh"], merged


def _mount_overlay(lower: Path, upper: Path, work: Path, target: Path) -> str:
    import shlex

    # Paths with ',' or ':' would split the option string: the lower is a symlink we made
    # where it matters (the project directory), the others live in our state directory.
    options = f"lowerdir={lower},upperdir={upper},workdir={work},userxattr"
    return f"mount -t overlay stockade -o {shlex.quote(options)} {shlex.quote(str(target))}"


@dataclass(frozen=True)
class OciRuntime:
    """A daemonless OCI runtime binary with its global flags and private state root."""

    name: str  # "runsc", "runc" or "crun"
    binary: str
    root: Path
    global_flags: tuple[str, ...] = ()

    def argv(self, *args: str) -> list[str]:
        return [self.binary, "--root", str(self.root), *self.global_flags, *args]

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            self.argv(*args), capture_output=True, timeout=timeout, check=False, cwd="/"
        )

    def container_ids(self) -> list[str]:
        """Every container this runtime knows under our root."""
        proc = self.run("list", "--format", "json")
        if proc.returncode != 0:
            return []
        try:
            data = json.loads(proc.stdout or b"null") or []
        except ValueError:
            return []
        return [str(c.get("id")) for c in data if isinstance(c, dict)]

    def exists(self, container_id: str) -> bool:
        """Whether the runtime still keeps state for the container under our root.

        Read from the root directory (runc/crun: a directory per container; runsc: files
        prefixed with the id) instead of spawning ``<runtime> state``: teardown asks this
        for every sandbox, and the answer is the runtime's own record either way.
        """
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return False
        return any(
            name == container_id
            or name.startswith(f"{container_id}_")
            or name == f"runsc-{container_id}.sock"
            for name in names
        )

    def delete(self, container_id: str) -> bool:
        """Kill and delete a container; False (and quiet) when it does not exist."""
        if not self.exists(container_id):
            return False
        self.run("kill", container_id, "KILL")
        proc = self.run("delete", "--force", container_id)
        if proc.returncode != 0 and self.exists(container_id):
            raise SandboxStateError(
                f"{self.name} could not delete container {container_id}: "
                f"{proc.stderr.decode(errors='replace').strip()}; remove it with "
                f"`{' '.join(self.argv('delete', '--force', container_id))}`"
            )
        return True

    def watchdog_argv(self, container_id: str) -> list[str]:
        """A shell that deletes the container when its stdin ends without a 'done' line.

        Its stdin is a pipe held only by the process that owns the sandbox: if that process
        dies (even ``kill -9``), the pipe ends and the container goes with it.
        """
        kill = " ".join(_quote(a) for a in self.argv("kill", container_id, "KILL"))
        delete = " ".join(_quote(a) for a in self.argv("delete", "--force", container_id))
        script = (
            'read line; [ "$line" = done ] && exit 0; '
            f"{kill} >/dev/null 2>&1; sleep 0.2; {delete} >/dev/null 2>&1; exit 0"
        )
        return ["/bin/sh", "-c", script]


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def stop_watchdog(watchdog: subprocess.Popen[bytes] | None) -> None:
    """Tell a watchdog its sandbox ended in order ("done") and wait for it to exit."""
    if watchdog is None or watchdog.stdin is None:
        return
    with contextlib.suppress(OSError):
        watchdog.stdin.write(b"done\n")
        watchdog.stdin.close()
    try:
        watchdog.wait(timeout=2)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait()


def start_watchdog(runtime: OciRuntime, container_id: str) -> subprocess.Popen[bytes]:
    """Start the watchdog of ``container_id`` in its own session (see ``watchdog_argv``)."""
    return subprocess.Popen(
        runtime.watchdog_argv(container_id),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
        cwd="/",
    )


async def open_runtime_process(
    argv: Sequence[str], log_path: Path, *, env: dict[str, str] | None = None
) -> Process:
    """Start the foreground runtime process; its stdio pipes are the agent's channel."""
    try:
        with log_path.open("ab") as log:
            return await anyio.open_process(
                list(argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env or {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
                cwd="/",
            )
    except OSError as exc:
        raise SandboxStartError(f"could not start {argv[0]}: {exc}") from exc


class OciContainerSandbox(ProcessSandbox):
    """A sandbox run by ``<runtime> run`` in the foreground; deleted and verified on teardown."""

    def __init__(
        self,
        process: Process,
        log_path: Path,
        *,
        runtime: OciRuntime,
        container_id: str,
        sandbox_id: str,
        watchdog: subprocess.Popen[bytes] | None,
        cgroups_path: str | None = None,
    ) -> None:
        super().__init__(process, log_path)
        self.cgroups_path = cgroups_path
        with contextlib.suppress(OSError):
            # If the runtime process dies (the sandbox's wall-clock timer kills it, or it
            # crashes), the container must not live on without it.
            pidfd = os.pidfd_open(process.pid)
            threading.Thread(target=self._lifeline, args=(pidfd,), daemon=True).start()
        self.runtime = runtime
        self.container_id = container_id
        self.sandbox_id = sandbox_id
        self._watchdog = watchdog
        self._cgroup_cache: Any = None

    def _lifeline(self, pidfd: int) -> None:
        try:
            select.select([pidfd], [], [])
        finally:
            os.close(pidfd)
        if not self._terminated and self.runtime.exists(self.container_id):
            self.runtime.run("kill", self.container_id, "KILL")

    def _cgroup(self) -> Any:
        """The container's cgroup, looked up at the path we gave the runtime (no search)."""
        from stockade.backends._cgroups import SandboxCgroup, _discover

        if self._cgroup_cache is None and self.cgroups_path is not None:
            dirs: list[Path] = []
            controllers: dict[str, Path] = {}
            unified = None
            for hierarchy in _discover():
                path = hierarchy.mount / self.cgroups_path.lstrip("/")
                if not path.is_dir():
                    continue
                dirs.append(path)
                if hierarchy.version == "v2":
                    unified = path
                for controller in hierarchy.controllers:
                    controllers.setdefault(controller, path)
            if dirs:
                self._cgroup_cache = SandboxCgroup(self.sandbox_id, dirs, controllers, unified)
        return self._cgroup_cache

    def resource_events(self) -> dict[str, bool]:
        group = self._cgroup()
        if group is None:
            return {}
        return {"oom_killed": group.oom_killed(), "pids_limit_hit": group.pids_limit_hit()}

    async def terminate(self, grace: float = 1.0) -> None:
        if self._terminated:
            return
        self._terminated = True
        with anyio.CancelScope(shield=True):
            # Look the cgroup up while it exists: its events explain a death afterwards.
            with contextlib.suppress(Exception):
                self._cgroup()
            # After agent.shutdown the runtime exits by itself and deletes the container;
            # a signal now would cut its own cleanup short.
            with anyio.move_on_after(grace):
                await self.process.wait()
            # The runtime forwards SIGTERM to the agent, which takes its children down.
            await self._term_process(grace)
            if self.process.returncode is None:
                await anyio.to_thread.run_sync(
                    lambda: self.runtime.run("kill", self.container_id, "KILL")
                )
                with anyio.move_on_after(5):
                    await self.process.wait()
            await self._kill_process_and_close()
            survivors = await anyio.to_thread.run_sync(self._delete_and_verify)
            if survivors:
                raise SandboxStateError(
                    f"the {self.runtime.name} container {self.container_id} survived teardown: "
                    f"{survivors}"
                )

    def _delete_and_verify(self) -> str:
        from stockade.backends._cgroups import remove_stale_cgroups

        problems: list[str] = []
        deleted = False
        try:
            deleted = self.runtime.delete(self.container_id)
        except SandboxStateError as exc:
            problems.append(str(exc))
        if deleted and self.runtime.exists(self.container_id):
            problems.append(f"`{self.runtime.name} state {self.container_id}` still finds it")
        group = self._cgroup()
        if group is not None:
            # The runtime removes the cgroup when the container goes; anything still in it
            # is killed and reported.
            left = group.pids()
            group.destroy()
            if left:
                problems.append(f"processes {sorted(left)} were still in its cgroup")
        elif self.cgroups_path is None:
            left = remove_stale_cgroups(self.sandbox_id)
            if left:
                problems.append(f"processes {sorted(left)} are still in its cgroup")
        self._stop_watchdog()
        return "; ".join(problems)

    def _stop_watchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        stop_watchdog(watchdog)


def reap_container(runtime: OciRuntime, sandbox_id: str) -> None:
    """Delete the container of a sandbox whose owner died (``stockade rm``); quiet if none."""
    runtime.delete(CONTAINER_PREFIX + sandbox_id)


def stockade_containers(runtime: str) -> list[str]:
    """Sandbox ids of the containers ``runtime`` knows under stockade's root."""
    binary = which(runtime)
    if binary is None:
        return []
    listed = OciRuntime(runtime, binary, runtime_state_root(runtime)).container_ids()
    return [c.removeprefix(CONTAINER_PREFIX) for c in listed if c.startswith(CONTAINER_PREFIX)]


def runtime_leftovers(runtime: str) -> tuple[Leftover, ...]:
    """The containers ``runtime`` keeps under stockade's root, as ``Backend.orphans`` says."""
    root = runtime_state_root(runtime)
    return tuple(
        Leftover(
            sandbox,
            f"{runtime} container {CONTAINER_PREFIX}{sandbox}",
            f"{runtime} --root {root} delete --force {CONTAINER_PREFIX}{sandbox}",
        )
        for sandbox in stockade_containers(runtime)
    )


def which(name: str) -> str | None:
    found = shutil.which(name)
    if found is None:
        for directory in ("/usr/sbin", "/usr/bin", "/sbin", "/usr/local/bin", "/usr/local/sbin"):
            candidate = Path(directory) / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return found


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.01)
    return False


async def launch_container(
    spec: LaunchSpec,
    runtime: OciRuntime,
    *,
    image: str,
    rootless: bool,
    seccomp: bool,
    landlock: bool,
    user_space_kernel: bool = False,
    overlay_extra: str = "",
) -> OciContainerSandbox:
    """Write the bundle of ``spec`` and start it with ``<runtime> run`` (runc, crun, runsc).

    ``image`` is ``"host"`` (the host's /usr read-only) or an image name; ``overlay_extra``
    is shell run in the workspace overlay's mount namespace before the runtime starts.
    """
    from stockade.backends.bubblewrap import compiled_agent

    rootfs = host_rootfs(spec.state_dir) if image == "host" else image_rootfs(image, spec.state_dir)
    # The agent compiled by the host's Python only runs on the same interpreter.
    agent = (
        compiled_agent(spec.agent_source, spec.cache_dir) if rootfs.host_usr else spec.agent_source
    )
    prefix, merged = overlay_prefix(spec, extra=overlay_extra, rootfs=rootfs)
    cgroups_path = None if rootless else sandbox_cgroup_path(spec.sandbox_id)
    config = build_config(
        spec,
        rootfs=rootfs,
        workspace_source=merged,
        agent=agent,
        cgroups_path=cgroups_path,
        seccomp=seccomp,
        landlock=landlock,
        user_space_kernel=user_space_kernel,
    )
    bundle = write_bundle(spec.state_dir, config)
    container_id = CONTAINER_PREFIX + spec.sandbox_id
    log_path = spec.state_dir / "sandbox.log"
    argv = [*prefix, *runtime.argv("run", "--bundle", str(bundle), container_id)]
    watchdog = start_watchdog(runtime, container_id)
    try:
        process = await open_runtime_process(argv, log_path)
    except SandboxStartError:
        if watchdog.stdin is not None:
            watchdog.stdin.close()
        raise
    return OciContainerSandbox(
        process,
        log_path,
        runtime=runtime,
        container_id=container_id,
        sandbox_id=spec.sandbox_id,
        watchdog=watchdog,
        cgroups_path=cgroups_path,
    )
