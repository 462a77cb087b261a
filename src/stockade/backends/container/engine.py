"""Docker and Podman engines of the container backend, through the Docker API (``docker`` SDK).

Podman is reached through its Docker-compatible service socket. The container gets the
same view as the other backends (the host's ``/usr`` and a curated ``/etc`` over a tiny
imported image, or an image-builder rootfs imported once, or any local image), with
``--cap-drop ALL``, ``no-new-privileges``, ``--network none``, a read-only root, the
engine's default seccomp profile and pids/memory/cpu limits. The workspace is a ``local``
volume of type overlay whose upper layer is the sandbox's host-side upper, so diff/apply
work unchanged; the engine mounts it when the container starts and unmounts it when the
container goes. The agent talks over the container's attached stdio (stdout demultiplexed
from the attach stream, stderr to the sandbox log).

Containers and volumes carry ``stockade.sandbox=<id>`` labels: teardown removes them and
checks none is left; a watchdog removes them if the owning process dies; ``stockade rm``
reaps whatever is left.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import os
import shlex
import socket
import struct
import subprocess
import tarfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import ByteStream, SocketStream

from stockade._errors import SandboxStartError, SandboxStateError
from stockade.backends._process import tail
from stockade.backends.base import Availability, LaunchedSandbox, LaunchSpec
from stockade.backends.oci_bundle import agent_argv, agent_binds, guest_agent_path, system_binds
from stockade.backends.oci_runtime import stop_watchdog, which

if TYPE_CHECKING:
    import docker

__all__ = [
    "LABEL",
    "EngineSandbox",
    "docker_sandbox_present",
    "launch_api_engine",
    "probe_api_engine",
    "reap_api_engines",
]

logger = logging.getLogger(__name__)

#: Label on every container and volume stockade creates; the value is the sandbox id.
LABEL = "stockade.sandbox"
_NAME_LABEL = "stockade.name"
_HOSTVIEW_REPO = "stockade/hostview"
_SDK_FIX = (
    "install the Docker SDK for Python: pip install 'stockade[docker]' (or pip install docker)"
)


def _engine_url(engine: str) -> str | None:
    """Where the engine's API listens: DOCKER_HOST / CONTAINER_HOST, else the default socket."""
    if engine == "docker":
        return os.environ.get("DOCKER_HOST") or None
    if os.environ.get("CONTAINER_HOST"):
        return os.environ["CONTAINER_HOST"]
    if os.getuid() == 0:
        return "unix:///run/podman/podman.sock"
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR", f"/run/user/{os.getuid()}")
    return f"unix://{runtime_dir}/podman/podman.sock"


#: API version negotiated once per engine URL in this process (Podman answers /version slowly:
#: ~130 ms, once per client otherwise).
_API_VERSIONS: dict[str, str] = {}


def client_for(engine: str, timeout: int = 60) -> docker.DockerClient:
    import docker

    url = _engine_url(engine)
    key = url or os.environ.get("DOCKER_HOST", "")
    known = _API_VERSIONS.get(key)
    if url is None:
        client = docker.from_env(timeout=timeout, version=known)
    else:
        client = docker.DockerClient(base_url=url, timeout=timeout, version=known)
    if known is None:
        _API_VERSIONS[key] = client.api.api_version
    return client


def docker_sandbox_present() -> bool:
    """Whether the ``docker sandbox`` CLI plugin (Docker Sandboxes) is installed."""
    cli = which("docker")
    if cli is None:
        return False
    try:
        proc = subprocess.run(
            [cli, "sandbox", "--help"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and b"sandbox" in proc.stdout.lower()


@functools.lru_cache(maxsize=4)
def probe_api_engine(engine: str) -> Availability:
    try:
        import docker  # noqa: F401
        from docker.errors import DockerException
    except ImportError:
        return Availability(False, "the docker Python SDK is not installed", _SDK_FIX)
    url = _engine_url(engine) or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    start_fix = (
        "start dockerd (e.g. `dockerd --iptables=false --bridge=none` as root) or point "
        "DOCKER_HOST at a running daemon"
        if engine == "docker"
        else "start the Podman API service (`podman system service --time=0 &`) or point "
        "CONTAINER_HOST at it"
    )
    if engine == "podman" and which("podman") is None and "CONTAINER_HOST" not in os.environ:
        return Availability(False, "podman not found on PATH", "apt-get install podman")
    try:
        client = client_for(engine, timeout=10)
        try:
            client.ping()
            version = client.version()
        finally:
            client.close()
    except DockerException as exc:
        return Availability(False, f"no {engine} API at {url}: {exc}", start_fix)
    name = str(version.get("Version", "?"))
    details = []
    if engine == "docker":
        details.append(
            "docker sandbox: present" if docker_sandbox_present() else "docker sandbox: not present"
        )
    return Availability(True, f"{engine} {name} at {url}", "", tuple(details))


def _hostview_tar() -> tuple[bytes, str]:
    """A tiny image: mount points and the host's merged-/usr symlinks; content hash as tag."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("usr", "etc", "proc", "dev", "tmp", "run", "sys"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if name == "tmp" else 0o755
            tar.addfile(info)
        for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            host = Path("/") / top
            info = tarfile.TarInfo(top)
            if host.is_symlink():
                info.type = tarfile.SYMTYPE
                info.linkname = os.readlink(host)
            elif host.is_dir():
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
            else:
                continue
            tar.addfile(info)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()[:16]


def _retag(client: docker.DockerClient, repo: str, tag: str) -> None:
    """Podman's Docker-compatible import ignores the tag (it names the image ':latest')."""
    from docker.errors import ImageNotFound

    try:
        client.images.get(f"{repo}:{tag}")
    except ImageNotFound:
        client.images.get(f"{repo}:latest").tag(repo, tag)


def _ensure_image(client: docker.DockerClient, image: str) -> tuple[str, bool]:
    """(image reference, host view?) for ``[container] image``; imports what is missing."""
    from docker.errors import ImageNotFound

    if image == "host":
        data, tag = _hostview_tar()
        ref = f"{_HOSTVIEW_REPO}:{tag}"
        try:
            client.images.get(ref)
        except ImageNotFound:
            client.api.import_image_from_data(
                data, repository=_HOSTVIEW_REPO, tag=tag, changes=["LABEL stockade.image=hostview"]
            )
            _retag(client, _HOSTVIEW_REPO, tag)
        return ref, True
    if image.isidentifier():  # an image-builder profile
        from stockade.images import ensure_rootfs

        built = ensure_rootfs(image)
        ref = f"stockade/rootfs-{image}:{built.key[:16]}"
        try:
            client.images.get(ref)
        except ImageNotFound:
            repo, _, tag = ref.partition(":")
            client.api.import_image_from_file(
                str(built.tar), repository=repo, tag=tag, changes=["LABEL stockade.image=rootfs"]
            )
            _retag(client, repo, tag)
        return ref, False
    try:
        client.images.get(image)
    except ImageNotFound as exc:
        raise SandboxStartError(
            f"image {image!r} is not in the local image store of the engine; pull or import "
            f"it first (e.g. `docker pull {image}`), stockade never pulls by itself"
        ) from exc
    return image, False


class AttachStream(ByteStream):
    """The agent's channel over a Docker attach connection (non-TTY: stdout/stderr framed).

    Frames are ``[stream, 0, 0, 0, size (4 bytes big-endian)] payload``; stdout payloads are
    the channel, stderr payloads go to the sandbox log.
    """

    def __init__(self, stream: SocketStream, log_path: Path) -> None:
        self._stream = stream
        self._log_path = log_path
        self._buffer = bytearray()
        self._remaining = 0  # payload bytes left in the current frame
        self._kind = 1

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while True:
            if self._remaining and self._buffer:
                take = min(self._remaining, len(self._buffer), max_bytes)
                chunk = bytes(self._buffer[:take])
                del self._buffer[:take]
                self._remaining -= take
                if self._kind == 1:
                    return chunk
                self._log(chunk)
                continue
            if not self._remaining and len(self._buffer) >= 8:
                kind, size = struct.unpack(">BxxxI", bytes(self._buffer[:8]))
                del self._buffer[:8]
                self._kind, self._remaining = kind, size
                continue
            data = await self._stream.receive(max(65536, max_bytes))
            self._buffer += data

    def _log(self, chunk: bytes) -> None:
        with contextlib.suppress(OSError), self._log_path.open("ab") as log:
            log.write(chunk)

    async def send(self, item: bytes) -> None:
        await self._stream.send(item)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


def _mount(source: str | Path, target: str, *, ro: bool = True) -> Any:
    from docker.types import Mount

    return Mount(target=target, source=str(source), type="bind", read_only=ro)


def _watchdog(engine: str, container: str, volume: str | None) -> subprocess.Popen[bytes] | None:
    """Remove the container (and volume) if the owner's pipe ends without 'done' (kill -9)."""
    cli = which(engine)
    if cli is None:
        return None  # the agent still exits on EOF of its stdin; `stockade rm` reaps the rest
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    for var in ("DOCKER_HOST", "CONTAINER_HOST", "DOCKER_CERT_PATH", "DOCKER_TLS_VERIFY", "HOME"):
        if var in os.environ:
            env[var] = os.environ[var]
    if engine == "podman" and "CONTAINER_HOST" not in env:
        url = _engine_url("podman")
        if url is not None:
            env["CONTAINER_HOST"] = url
    base = shlex.quote(cli)
    if engine == "podman":
        # The service's own storage, not the CLI's local default.
        base += f" --remote --url {shlex.quote(env.get('CONTAINER_HOST', ''))}"
    rm = f"{base} rm -f -v {shlex.quote(container)} >/dev/null 2>&1"
    if volume is not None:
        rm += f"; {base} volume rm -f {shlex.quote(volume)} >/dev/null 2>&1"
    script = f'read line; [ "$line" = done ] && exit 0; {rm}; exit 0'
    return subprocess.Popen(
        ["/bin/sh", "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
        cwd="/",
        env=env,
    )


def _create(spec: LaunchSpec, engine: str) -> tuple[Any, str, str | None, Any]:
    """Create the volume and container (not started); returns (client, id, volume, socket)."""
    from docker.errors import APIError, DockerException
    from docker.types import Ulimit

    policy = spec.policy
    ws = policy.workspace
    limits = policy.limits
    client = client_for(engine)
    labels = {LABEL: spec.sandbox_id, _NAME_LABEL: spec.name}
    volume: str | None = None
    try:
        runtime = policy.container.runtime
        if runtime is not None:
            known = client.info().get("Runtimes", {}) or {}
            if runtime not in known:
                raise SandboxStartError(
                    f"container.runtime = {runtime!r} is not registered with {engine} "
                    f"(known: {', '.join(sorted(known)) or 'none'}); add it to the engine's "
                    'configuration (dockerd: "runtimes" in daemon.json; for runsc with '
                    '"runtimeArgs": ["--network=none"]) or unset container.runtime'
                )
        image, host_view = _ensure_image(client, policy.container.image)
        mounts: list[Any] = []
        mounts.extend(_mount(src, dest) for src, dest in system_binds(spec, host_usr=host_view))
        if host_view:
            from stockade.backends.bubblewrap import compiled_agent

            agent = compiled_agent(spec.agent_source, spec.cache_dir)
        else:
            agent = spec.agent_source
        mounts.extend(_mount(src, dest) for src, dest in agent_binds(spec, agent))
        if ws.mode == "none" or ws.host_path is None:
            cwd = "/tmp/home"
        else:
            from docker.types import Mount

            if ws.mode == "cow" and spec.workspace is not None:
                volume = f"stockade-{spec.sandbox_id}"
                lower_link = spec.state_dir / "lower"
                if not lower_link.is_symlink():
                    lower_link.symlink_to(spec.workspace.lower)
                options = (
                    f"lowerdir={lower_link},upperdir={spec.workspace.upper},"
                    f"workdir={spec.workspace.work},userxattr"
                )
                client.api.create_volume(
                    volume,
                    driver="local",
                    driver_opts={"type": "overlay", "device": "stockade", "o": options},
                    labels=labels,
                )
                mounts.append(Mount(target=ws.guest_path, source=volume, type="volume"))
            else:
                mounts.append(_mount(ws.host_path, ws.guest_path, ro=ws.mode == "ro"))
            for rel in ws.protected:
                host_rel = ws.host_path / rel
                if os.path.lexists(host_rel) and not host_rel.is_symlink():
                    # The host's own copy, read-only: the sandbox sees it but never writes it.
                    mounts.append(_mount(host_rel, f"{ws.guest_path}/{rel}"))
            cwd = ws.guest_path
        env = dict(policy.env)
        if spec.egress is not None:
            env.update(spec.egress.env)
        uid, gid = os.getuid(), os.getgid()
        from stockade.workspace.disk import fresh_tmp

        tmpfs = {"/run": "rw,nosuid,nodev,mode=755,size=16m"}
        tmp_dir = fresh_tmp(spec.state_dir, uid)
        if tmp_dir is not None:
            # On the sandbox's own disk: /tmp and home share limits.disk with the workspace.
            mounts.append(_mount(tmp_dir, "/tmp", ro=False))
        else:
            tmp_size = limits.disk_bytes or limits.memory_bytes
            size = f",size={tmp_size}" if tmp_size else ""
            tmpfs["/tmp"] = f"rw,nosuid,nodev,mode=1777{size}"
            # Podman refuses uid=/gid= here; its tmpfs belongs to the container's user anyway.
            tmpfs["/tmp/home"] = "rw,nosuid,nodev,mode=700" + (
                "" if engine == "podman" else f",uid={uid},gid={gid}"
            )
        if host_view and os.path.isdir("/etc/ssl/private"):
            # The sandbox runs as the caller (root when stockade is): hide private TLS keys.
            tmpfs["/etc/ssl/private"] = "ro,nosuid,nodev,noexec,mode=700,size=4k"
        ulimits = [Ulimit(name="core", soft=0, hard=0)]
        if engine == "podman":
            # Podman asks for rlimits above the hard limit when CAP_SYS_RESOURCE is missing.
            ulimits += [
                Ulimit(name="nofile", soft=4096, hard=4096),
                Ulimit(name="nproc", soft=4096, hard=4096),
            ]
        security_opt = ["no-new-privileges:true"]
        if engine == "podman":
            # Podman's default profile lets a process create user namespaces (Docker's does
            # not); ours refuses them, like every other backend on the host kernel.
            import json

            from stockade.backends.oci_bundle import oci_seccomp

            profile = spec.state_dir / "seccomp.json"
            profile.write_text(json.dumps(oci_seccomp(), separators=(",", ":")))
            security_opt.append(f"seccomp={profile}")  # podman reads a path, not the JSON
        host_config = client.api.create_host_config(
            mounts=mounts,
            tmpfs=tmpfs,
            network_mode="none",
            cap_drop=["ALL"],
            security_opt=security_opt,
            read_only=True,
            pids_limit=limits.pids or None,
            mem_limit=limits.memory_bytes or None,
            memswap_limit=limits.memory_bytes or None,
            nano_cpus=int(limits.cpus * 1e9) if limits.cpus else None,
            ulimits=ulimits,
            init=False,
            runtime=runtime,
        )
        argv = agent_argv(
            spec,
            python="/usr/bin/python3",
            guest_agent=guest_agent_path(agent),
            cwd=cwd,
            landlock=True,
        )
        created = client.api.create_container(
            image,
            command=argv,
            entrypoint=[],
            hostname=policy.hostname,
            # No user namespace here: the caller's own uid with no capabilities owns the
            # workspace files, as user 1000 does in the other backends.
            user=f"{uid}:{gid}",
            environment=[f"{k}={v}" for k, v in sorted(env.items())],
            working_dir=cwd,
            labels=labels,
            stdin_open=True,
            tty=False,
            host_config=host_config,
            name=f"stockade-{spec.sandbox_id}",
        )
        container_id = str(created["Id"])
        sock = client.api.attach_socket(
            container_id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
        )
        return client, container_id, volume, sock
    except (DockerException, APIError) as exc:
        _remove(client, spec.sandbox_id)
        client.close()
        raise SandboxStartError(f"{engine} could not create the sandbox container: {exc}") from exc
    except BaseException:
        _remove(client, spec.sandbox_id)
        client.close()
        raise


def _remove(client: Any, sandbox_id: str, timeout: float = 10.0) -> list[str]:
    """Remove every container and volume labelled with this sandbox; return what is left."""
    from docker.errors import APIError, NotFound

    selector = {"label": f"{LABEL}={sandbox_id}"}
    for container in client.api.containers(all=True, filters=selector):
        with contextlib.suppress(NotFound):
            client.api.remove_container(container["Id"], force=True, v=True)
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for vol in client.api.volumes(filters=selector).get("Volumes") or []:
            try:
                client.api.remove_volume(vol["Name"], force=True)
            except NotFound:
                continue
            except APIError as exc:  # still in use for a moment after the container went
                left.append(f"volume {vol['Name']} ({exc.explanation})")
        left += [
            f"container {c['Id'][:12]}" for c in client.api.containers(all=True, filters=selector)
        ]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


class EngineSandbox(LaunchedSandbox):
    """A container run by Docker or Podman; removed (with its volume) and verified on teardown."""

    def __init__(
        self,
        *,
        engine: str,
        client: Any,
        container_id: str,
        sandbox_id: str,
        channel: AttachStream,
        log_path: Path,
        watchdog: subprocess.Popen[bytes] | None,
    ) -> None:
        self.engine = engine
        self.client = client
        self.container_id = container_id
        self.sandbox_id = sandbox_id
        self.channel = channel
        self.log_path = log_path
        self._watchdog = watchdog
        self._terminated = False
        self._oom: bool | None = None
        if watchdog is not None:
            # The watchdog doubles as the sandbox's lifeline process: whoever kills it takes
            # the container down with it.
            threading.Thread(target=self._lifeline, args=(watchdog,), daemon=True).start()

    def _lifeline(self, watchdog: subprocess.Popen[bytes]) -> None:
        watchdog.wait()
        if self._terminated or watchdog.returncode == 0:
            return  # our own teardown, or the watchdog did its job
        self.kill_now()

    def kill_now(self) -> None:
        """Kill the container through the engine's API (a client of this thread's own: the
        sandbox's may be in use), with or without the engine's CLI."""
        from docker.errors import DockerException

        try:
            client = client_for(self.engine, timeout=30)
        except DockerException:
            logger.warning("sandbox %s: %s is unreachable to kill it", self.sandbox_id, self.engine)
            return
        try:
            client.api.kill(self.container_id)
        except DockerException:
            pass  # not running any more
        finally:
            client.close()

    def _state(self) -> dict[str, Any] | None:
        from docker.errors import DockerException, NotFound

        try:
            state: dict[str, Any] = self.client.api.inspect_container(self.container_id)["State"]
        except NotFound:
            return None
        except DockerException:
            return None
        return state

    def alive(self) -> bool:
        state = self._state()
        return bool(state and state.get("Running"))

    def failure_details(self) -> str:
        return tail(self.log_path)

    def resource_events(self) -> dict[str, bool]:
        if self._oom is None:
            state = self._state()
            if state is None:
                return {}
            return {"oom_killed": bool(state.get("OOMKilled"))}
        return {"oom_killed": self._oom}

    async def terminate(self, grace: float = 1.0) -> None:
        if self._terminated:
            return
        self._terminated = True
        with anyio.CancelScope(shield=True):
            left = await anyio.to_thread.run_sync(self._stop_and_remove, grace)
            with contextlib.suppress(Exception):
                await self.channel.aclose()
            self._stop_watchdog()
            with contextlib.suppress(Exception):
                self.client.close()
            # The engine's helpers (Podman's conmon) may outlive the API call for a moment.
            survivors = await anyio.to_thread.run_sync(
                _wait_processes_gone, f"stockade-{self.sandbox_id}", 5.0
            )
            if survivors:
                left.append(f"processes {survivors}")
            if left:
                raise SandboxStateError(
                    f"{self.engine} left parts of sandbox {self.sandbox_id} behind: "
                    f"{', '.join(left)}; remove them with `{self.engine} rm -f -v` / "
                    f"`{self.engine} volume rm` (label {LABEL}={self.sandbox_id})"
                )

    def _stop_and_remove(self, grace: float) -> list[str]:
        from docker.errors import DockerException

        # After agent.shutdown the container exits by itself.
        deadline = time.monotonic() + grace
        state = self._state()
        while state is not None and state.get("Running") and time.monotonic() < deadline:
            time.sleep(0.01)
            state = self._state()
        if state is not None:
            self._oom = bool(state.get("OOMKilled"))
            if state.get("Running"):
                with contextlib.suppress(DockerException):
                    self.client.api.kill(self.container_id)
        try:
            return _remove(self.client, self.sandbox_id)
        except DockerException as exc:
            return [f"{self.engine} API error: {exc}"]

    def _stop_watchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        stop_watchdog(watchdog)


def _wait_processes_gone(marker: str, timeout: float) -> list[int]:
    """Pids whose command line names ``marker`` still alive after ``timeout`` seconds."""
    needle = marker.encode()
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if needle in f.read():
                        found.append(int(entry.name))
            except OSError:
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def _raw_socket(sock: Any) -> socket.socket:
    """A socket of our own (dup) from what the SDK's attach returned."""
    raw = getattr(sock, "_sock", sock)
    if not isinstance(raw, socket.socket):
        raise SandboxStartError(
            f"the attach connection is not a plain socket ({type(raw).__name__}); use a "
            "unix or tcp DOCKER_HOST"
        )
    dup = socket.socket(raw.family, raw.type, raw.proto, fileno=os.dup(raw.fileno()))
    with contextlib.suppress(Exception):
        sock.close()
    return dup


async def launch_api_engine(spec: LaunchSpec, engine: str) -> EngineSandbox:
    from docker.errors import DockerException

    log_path = spec.state_dir / "sandbox.log"
    client, container_id, volume, sock = await anyio.to_thread.run_sync(_create, spec, engine)
    watchdog = _watchdog(engine, container_id, volume)
    try:
        stream = await SocketStream.from_socket(_raw_socket(sock))
        await anyio.to_thread.run_sync(client.api.start, container_id)
    except (DockerException, OSError, SandboxStartError) as exc:
        await anyio.to_thread.run_sync(_remove, client, spec.sandbox_id)
        # Removed already: the watchdog has nothing left to do, and must not outlive the
        # failed start (a long-lived SDK process would collect one per failure).
        await anyio.to_thread.run_sync(stop_watchdog, watchdog)
        client.close()
        raise SandboxStartError(f"{engine} could not start the sandbox container: {exc}") from exc
    return EngineSandbox(
        engine=engine,
        client=client,
        container_id=container_id,
        sandbox_id=spec.sandbox_id,
        channel=AttachStream(stream, log_path),
        log_path=log_path,
        watchdog=watchdog,
    )


def reap_api_engines(sandbox_id: str) -> None:
    """Remove what is left of a sandbox on any reachable engine (quiet when none runs)."""
    for engine in ("docker", "podman"):
        if not probe_api_engine(engine).ok:
            continue
        client = client_for(engine, timeout=30)
        try:
            left = _remove(client, sandbox_id)
        finally:
            client.close()
        if left:
            raise SandboxStateError(f"{engine} could not remove {', '.join(left)}")


def orphans(engine: str) -> list[dict[str, str]]:
    """Containers labelled by stockade on this engine: id, sandbox id, name, status."""
    if not probe_api_engine(engine).ok:
        return []
    client = client_for(engine, timeout=30)
    try:
        found = client.api.containers(all=True, filters={"label": LABEL})
    finally:
        client.close()
    return [
        {
            "engine": engine,
            "container": c["Id"][:12],
            "sandbox": c.get("Labels", {}).get(LABEL, ""),
            "name": c.get("Labels", {}).get(_NAME_LABEL, ""),
            "status": c.get("Status", ""),
        }
        for c in found
    ]
