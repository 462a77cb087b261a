"""Honest fakes for the VMM driver tests: Firecracker's API checked against its published
OpenAPI spec, and hybrid vsock peers that follow (or break) the documented protocol.

Nothing here fakes isolation: these stand in for the control plane of a VMM that cannot
run on this machine, so the driver's requests and handshakes are tested byte for byte.

Also the helpers those tests share: the fixtures ``anyio_backend`` (asyncio only) and
``tmp`` (a short directory for unix sockets), which a test module imports by their function
names (``asyncio_only``, ``socket_tmp``), ``vm_spec`` and ``hide_vmm_binaries``.
"""

from __future__ import annotations

import contextlib
import copy
import http.server
import json
import re
import socket
import socketserver
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import jsonschema
import pytest
import yaml
from openapi_spec_validator import OpenAPIV2SpecValidator, validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

from stockade.backends.microvm.driver import AgentTransport, DiskSpec, VmSpec

SPEC_PATH = Path(__file__).resolve().parent / "specs" / "firecracker-api.yaml"
_SPEC_URI = "urn:stockade-test:firecracker-api"


#: Every environment variable a VMM driver reads its binary's path from.
VMM_BINARY_VARS = ("STOCKADE_FIRECRACKER", "STOCKADE_CLOUD_HYPERVISOR", "STOCKADE_VFKIT")


@pytest.fixture(name="anyio_backend")
def asyncio_only() -> str:
    return "asyncio"


def short_tmp() -> Iterator[Path]:
    """A short directory for unix sockets (their paths are limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="stk-", dir="/tmp") as name:
        yield Path(name)


@pytest.fixture(name="tmp")
def socket_tmp() -> Iterator[Path]:
    yield from short_tmp()


#: (file name, read only, drive id) of the read-only root image and of a workspace disk.
ROOT_DISK = ("root.erofs", True, "root")
WORK_DISK = ("work.ext4", False, "work")


def vm_spec(
    images: Path,
    workdir: Path,
    *,
    kernel: str = "vmlinux",
    initrd: str = "initrd.gz",
    disks: tuple[tuple[str, bool, str], ...] = (ROOT_DISK, WORK_DISK),
    vcpus: int = 2,
    memory_mib: int = 512,
    cmdline: str = "quiet stockade.root=vda",
    agent: AgentTransport | None = None,
    create_files: bool = False,
) -> VmSpec:
    """A VmSpec whose kernel, initrd and disks are the files so named in ``images`` (written,
    one byte each, with ``create_files``); by default the agent is on vsock, its socket
    ``workdir/agent.vsock``."""
    if create_files:
        images.mkdir(exist_ok=True)
        for name in (kernel, initrd, *(disk[0] for disk in disks)):
            (images / name).write_bytes(b"x")
    return VmSpec(
        kernel=images / kernel,
        initrd=images / initrd,
        disks=tuple(DiskSpec(images / name, ro, drive_id) for name, ro, drive_id in disks),
        vcpus=vcpus,
        memory_mib=memory_mib,
        cmdline=cmdline,
        workdir=workdir,
        agent=agent or AgentTransport("vsock", workdir / "agent.vsock"),
    )


def hide_vmm_binaries(monkeypatch: pytest.MonkeyPatch, empty_dir: Path) -> None:
    """No VMM binary can be found: PATH is ``empty_dir`` and no STOCKADE_<VMM> is set."""
    monkeypatch.setenv("PATH", str(empty_dir))
    for var in VMM_BINARY_VARS:
        monkeypatch.delenv(var, raising=False)


class SpecViolation(Exception):
    """A request that Firecracker's API spec does not allow."""


def _strict(node: Any) -> Any:
    """Forbid unknown fields in every object schema that lists its properties.

    The spec leaves ``additionalProperties`` open, but Firecracker's server deserializes its
    request bodies with serde's ``deny_unknown_fields``, so a misspelt field is a 400 there.
    """
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if out.get("type") == "object" and "properties" in out:
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@dataclass(frozen=True)
class Operation:
    method: str
    template: str
    pattern: re.Pattern[str]
    path_params: dict[str, dict[str, Any]]
    body_schema: dict[str, Any] | None
    body_required: bool


class FirecrackerSpec:
    """Firecracker's swagger 2.0 spec, validated itself, and a strict request validator."""

    def __init__(self, path: Path = SPEC_PATH) -> None:
        # JSON round trip: YAML reads response codes as ints; JSON (and swagger) key by string.
        self.document: dict[str, Any] = json.loads(json.dumps(yaml.safe_load(path.read_text())))
        validate(self.document, cls=OpenAPIV2SpecValidator)
        self.version = str(self.document["info"]["version"])
        strict = _strict(copy.deepcopy(self.document))
        self._registry: Registry[Any] = Registry().with_resource(
            _SPEC_URI, Resource.from_contents(strict, default_specification=DRAFT4)
        )
        self.operations: list[Operation] = []
        for template, item in self.document["paths"].items():
            regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
            for method, op in item.items():
                params = op.get("parameters", [])
                body = next((p for p in params if p.get("in") == "body"), None)
                self.operations.append(
                    Operation(
                        method=method.upper(),
                        template=template,
                        pattern=re.compile(f"^{regex}$"),
                        path_params={p["name"]: p for p in params if p.get("in") == "path"},
                        body_schema=self._resolve(body["schema"]) if body else None,
                        body_required=bool(body and body.get("required")),
                    )
                )

    def _resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        if "$ref" in schema:
            return {"$ref": _SPEC_URI + schema["$ref"]}
        return _strict(schema)  # type: ignore[no-any-return]

    def operation(self, method: str, path: str) -> tuple[Operation, dict[str, str]]:
        templates = [op for op in self.operations if op.pattern.match(path)]
        if not templates:
            raise SpecViolation(f"no path in the Firecracker API matches {path!r}")
        for op in templates:
            match = op.pattern.match(path)
            if op.method == method.upper() and match:
                return op, match.groupdict()
        allowed = sorted(op.method for op in templates)
        raise SpecViolation(f"{method} is not allowed on {path!r} (allowed: {allowed})")

    def validate(self, method: str, path: str, body: Any) -> str:
        """Raise SpecViolation unless the spec allows this request; return the operation id."""
        op, params = self.operation(method, path)
        for name, value in params.items():
            if op.path_params[name].get("type") == "string" and not value:
                raise SpecViolation(f"empty path parameter {name!r}")
        if op.body_schema is None:
            if body is not None:
                raise SpecViolation(f"{method} {op.template} takes no body, got {body!r}")
        elif body is None:
            if op.body_required:
                raise SpecViolation(f"{method} {op.template} requires a body")
        else:
            validator = jsonschema.Draft4Validator(op.body_schema, registry=self._registry)
            errors = sorted(validator.iter_errors(body), key=lambda e: list(e.path))
            if errors:
                raise SpecViolation(
                    f"{method} {op.template}: "
                    + "; ".join(f"{list(e.path)}: {e.message}" for e in errors)
                )
        item = self.document["paths"][op.template][op.method.lower()]
        return str(item.get("operationId", ""))


# --------------------------------------------------------------------------- vsock peers


class HybridVsockPeer:
    """A VMM's hybrid vsock socket: reads ``CONNECT <port>\\n`` and answers per ``mode``.

    Modes: ``ok`` (``OK <n>\\n`` then echo; refuses ports not in ``ports``), ``ok+data``
    (reply and first guest bytes in one write), ``refuse`` (close without a reply),
    ``silent`` (never answer), or any ``bytes`` (sent as the reply, then close).
    """

    def __init__(self, path: Path, mode: str | bytes = "ok", ports: set[int] | None = None):
        self.path = path
        self.mode = mode
        self.ports = {1024} if ports is None else ports
        self.requests: list[bytes] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(16)
        self._closed = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        for conn in self._conns:
            conn.close()
        self._thread.join(5)

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        line = b""
        while not line.endswith(b"\n") and len(line) < 64:
            chunk = conn.recv(1)
            if not chunk:
                conn.close()
                return
            line += chunk
        self.requests.append(line)
        match = re.fullmatch(rb"CONNECT (\d+)\n", line)
        mode = self.mode
        if mode == "silent":
            self._closed.wait()
            return
        if isinstance(mode, bytes):
            conn.sendall(mode)
            conn.close()
            return
        if mode == "refuse" or match is None or int(match.group(1)) not in self.ports:
            conn.close()
            return
        if mode == "ok+data":
            conn.sendall(b"OK 1073741824\nguest-first")
        else:
            conn.sendall(b"OK 1073741824\n")
        while True:  # echo: the "guest" side of the stream
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                conn.close()
                return
            conn.sendall(data)


# --------------------------------------------------------------------------- fake API


@dataclass
class FakeFirecrackerState:
    """What a Firecracker process would hold, enough to refuse out-of-order calls."""

    state: str = "Not started"
    configured: set[str] = field(default_factory=set)
    vsock_uds: str | None = None
    calls: list[tuple[str, str, Any]] = field(default_factory=list)
    refused: list[tuple[str, str, str]] = field(default_factory=list)


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    owner: _FakeApi


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _UnixHTTPServer
    protocol_version = "HTTP/1.1"

    def address_string(self) -> str:  # unix sockets have no peer address
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = None
        status, answer = 400, None
        try:
            if raw:
                if self.headers.get("Content-Type") != "application/json":
                    raise SpecViolation(f"Content-Type {self.headers.get('Content-Type')!r}")
                body = json.loads(raw)
            status, answer = self.server.owner.handle(self.command, self.path, body)
        except (SpecViolation, ValueError) as exc:
            self.server.owner.refused.append((self.command, self.path, str(exc)))
            status, answer = 400, {"fault_message": str(exc)}
        data = json.dumps(answer).encode() if answer is not None else b""
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_PATCH = _handle


class _FakeApi:
    """A VMM's HTTP API on a unix socket, served from a thread until ``close``. Subclasses
    answer in ``handle``; what it refuses (``SpecViolation``) is a 400 and recorded."""

    def __init__(self, api_socket: Path) -> None:
        self.api_socket = api_socket
        self._server = _UnixHTTPServer(str(api_socket), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), daemon=True
        )
        self._thread.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def refused(self) -> list[tuple[str, str, str]]:
        raise NotImplementedError

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        raise NotImplementedError

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class FakeFirecracker(_FakeApi):
    """Firecracker's API on a unix socket: each request is validated against the spec, its
    order checked the way Firecracker checks it, and recorded. The vsock socket it would
    create is a ``HybridVsockPeer`` bound when the VM runs."""

    PRE_BOOT = frozenset({"/boot-source", "/machine-config", "/vsock", "/drives"})

    def __init__(self, api_socket: Path, spec: FirecrackerSpec, *, vsock_mode: str = "ok"):
        self.spec = spec
        self.state = FakeFirecrackerState()
        self.vsock_mode = vsock_mode
        self.vsock: HybridVsockPeer | None = None
        super().__init__(api_socket)

    def close(self) -> None:
        super().close()
        if self.vsock is not None:
            self.vsock.close()

    @property
    def calls(self) -> list[tuple[str, str, Any]]:
        return self.state.calls

    @property
    def refused(self) -> list[tuple[str, str, str]]:
        return self.state.refused

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        operation = self.spec.validate(method, path, body)
        s = self.state
        group = "/drives" if path.startswith("/drives/") else path
        if method == "GET" and path == "/":
            return 200, {
                "app_name": "Firecracker",
                "id": "fake",
                "state": s.state,
                "vmm_version": self.spec.version,
            }
        s.calls.append((method, path, body))
        if method == "PUT" and group in self.PRE_BOOT:
            if s.state != "Not started":
                raise SpecViolation(f"{operation} is pre-boot only; the VM is {s.state}")
            if group == "/drives" and body["drive_id"] != path.rsplit("/", 1)[1]:
                raise SpecViolation("drive_id in the body differs from the path")
            s.configured.add(group)
            if group == "/vsock":
                # Firecracker binds the socket when the device is configured; the guest
                # listens on nothing until it runs, so connections are refused until then.
                s.vsock_uds = body["uds_path"]
                self.vsock = HybridVsockPeer(Path(s.vsock_uds), self.vsock_mode, ports=set())
            return 204, None
        if path == "/actions":
            if body["action_type"] == "InstanceStart":
                if s.state != "Not started" or "/boot-source" not in s.configured:
                    raise SpecViolation("InstanceStart needs a boot source, on a fresh VM")
                self._run()
            return 204, None
        if path == "/vm":
            if s.state == "Not started":
                raise SpecViolation("the VM is not started")
            s.state = "Paused" if body["state"] == "Paused" else "Running"
            return 204, None
        if path == "/snapshot/create":
            if s.state != "Paused":
                raise SpecViolation("snapshots are taken of a paused VM")
            Path(body["snapshot_path"]).write_text(json.dumps({"vsock": s.vsock_uds}))
            Path(body["mem_file_path"]).write_bytes(b"\0" * 4096)
            return 204, None
        if path == "/snapshot/load":
            if s.state != "Not started" or s.configured:
                raise SpecViolation("snapshot load is only accepted on a fresh process")
            saved = json.loads(Path(body["snapshot_path"]).read_text())
            backend = body.get("mem_backend", {}).get("backend_path") or body.get("mem_file_path")
            if backend is None or not Path(backend).is_file():
                raise SpecViolation(f"memory file {backend!r} missing")
            s.vsock_uds = body.get("vsock_override", {}).get("uds_path", saved["vsock"])
            self.vsock = HybridVsockPeer(Path(s.vsock_uds), self.vsock_mode, ports=set())
            s.state = "Paused"
            if body.get("resume_vm"):
                self._run()
            return 204, None
        raise SpecViolation(f"the fake does not implement {method} {path}")

    def _run(self) -> None:
        self.state.state = "Running"
        if self.vsock is not None:
            self.vsock.ports = {1024}  # the guest agent is up


class FakeCloudHypervisor(_FakeApi):
    """Cloud Hypervisor's REST API (the endpoints the driver uses) on a unix socket, with
    the state checks the VMM makes: pause before snapshot, restore only on an empty VMM."""

    def __init__(self, api_socket: Path, *, vm: str = "Running") -> None:
        self.vm = vm  # "None" (bare VMM), "Running", "Paused"
        self.calls: list[tuple[str, str, Any]] = []
        self._refused: list[tuple[str, str, str]] = []
        super().__init__(api_socket)

    @property
    def refused(self) -> list[tuple[str, str, str]]:
        return self._refused

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if not path.startswith("/api/v1/"):
            raise SpecViolation(f"Cloud Hypervisor serves /api/v1/..., not {path}")
        endpoint = path.removeprefix("/api/v1/")
        if (method, endpoint) == ("GET", "vmm.ping"):
            return 200, {"version": "fake", "build_version": "fake"}
        self.calls.append((method, endpoint, body))
        if method != "PUT":
            raise SpecViolation(f"{endpoint} takes PUT, not {method}")
        if endpoint == "vm.pause":
            if self.vm != "Running":
                raise SpecViolation("the VM is not running")
            self.vm = "Paused"
        elif endpoint == "vm.resume":
            if self.vm != "Paused":
                raise SpecViolation("the VM is not paused")
            self.vm = "Running"
        elif endpoint == "vm.snapshot":
            if self.vm != "Paused" or set(body) != {"destination_url"}:
                raise SpecViolation("snapshot needs a paused VM and a destination_url")
            target = Path(body["destination_url"].removeprefix("file://"))
            (target / "config.json").write_text(
                json.dumps({"vsock": {"cid": 3, "socket": "/old/agent.vsock"},
                            "serial": {"mode": "File", "file": "/old/console.log"},
                            "memory": {"size": 536870912}})
            )  # fmt: skip
            (target / "state.json").write_text("{}")
            (target / "memory-ranges").write_bytes(b"\0" * 4096)
        elif endpoint == "vm.restore":
            if self.vm != "None" or not body["source_url"].startswith("file://"):
                raise SpecViolation("restore needs an empty VMM and a file:// source_url")
            source = Path(body["source_url"].removeprefix("file://"))
            self.restored_config = json.loads((source / "config.json").read_text())
            self.vm = "Paused"
        elif endpoint == "vmm.shutdown":
            self.vm = "None"
        else:
            raise SpecViolation(f"the fake does not implement {endpoint}")
        return 204, None


# --------------------------------------------------------------------------- fake VMM processes


def _serve_until_terminated(banner: str) -> None:
    import signal
    import sys

    print(banner, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    print("terminated", flush=True)
    sys.exit(0)


def fake_firecracker_main(argv: list[str]) -> None:
    """``firecracker --api-sock PATH --id ID``: the fake API (spec-checked) in a process."""
    api = Path(argv[argv.index("--api-sock") + 1])
    FakeFirecracker(api, FirecrackerSpec())
    _serve_until_terminated(f"fake firecracker {argv}")


def fake_cloud_hypervisor_main(argv: list[str]) -> None:
    """``cloud-hypervisor --api-socket path=P [--vsock cid=N,socket=S ...]`` in a process."""
    api = Path(argv[argv.index("--api-socket") + 1].removeprefix("path="))
    if "--vsock" in argv:
        options = dict(kv.split("=", 1) for kv in argv[argv.index("--vsock") + 1].split(","))
        HybridVsockPeer(Path(options["socket"]))
        FakeCloudHypervisor(api, vm="Running")
    else:
        fake = FakeCloudHypervisor(api, vm="None")
        original = fake.handle

        def handle(method: str, path: str, body: Any) -> tuple[int, Any]:
            answer = original(method, path, body)
            if path.endswith("/vm.restore"):  # the restored VM's vsock socket appears
                HybridVsockPeer(Path(fake.restored_config["vsock"]["socket"]))
            return answer

        fake.handle = handle  # type: ignore[method-assign]
    _serve_until_terminated(f"fake cloud-hypervisor {argv}")


def write_fake_vmm(directory: Path, name: str, entry: str) -> Path:
    """An executable ``directory/name`` that runs ``entry`` of this module with its argv."""
    import sys

    script = directory / name
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        f"from microvm_fakes import {entry}\n"
        f"{entry}(sys.argv[1:])\n"
    )
    script.chmod(0o755)
    return script


def write_exiting_vmm(directory: Path, name: str, message: str) -> Path:
    """An executable ``directory/name`` that prints ``message`` and exits with status 1, as a
    VMM does when it cannot start (no KVM, no Virtualization.framework)."""
    script = directory / name
    script.write_text(f"#!/bin/sh\necho '{message}'\nexit 1\n")
    script.chmod(0o755)
    return script


def fake_vfkit_main(argv: list[str]) -> None:
    """``vfkit ... --device virtio-vsock,port=P,socketURL=S,listen``: the "guest" dials S."""
    vsock = next(a for a in argv if a.startswith("virtio-vsock,"))
    options = dict(kv.split("=", 1) for kv in vsock.split(",")[1:] if "=" in kv)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(options["socketURL"])
    print(f"fake vfkit {argv}", flush=True)

    def echo() -> None:
        while data := conn.recv(65536):
            conn.sendall(data)

    threading.Thread(target=echo, daemon=True).start()
    _serve_until_terminated("guest connected")
