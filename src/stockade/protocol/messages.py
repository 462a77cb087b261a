"""Every message of the guest agent protocol, as pydantic models.

The host validates everything the guest sends against these models (the guest is hostile).
``METHODS`` maps a method name to its params and result models, ``NOTIFICATIONS`` a
notification name to its params model; ``stockade.protocol.schema`` turns both into the
checked-in JSON schema. Binary data travels base64-encoded in ``data`` fields, except the
egress tunnel's stream data once both sides agreed on binary stream frames (see
``stockade.protocol.framing``).

Versioning: adding an optional field is a minor bump of ``PROTOCOL_VERSION``; adding a
required field or removing one is a major bump.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "CONTROL_METHODS",
    "ERROR_CODES",
    "HOST_NOTIFICATIONS",
    "MAX_STREAM_WINDOW",
    "METHODS",
    "NOTIFICATIONS",
    "PROTOCOL_VERSION",
    "STREAM_WINDOW",
    "AgentHelloParams",
    "AgentHelloResult",
    "Empty",
    "FsEntry",
    "FsListParams",
    "FsListResult",
    "FsMkdirParams",
    "FsPathParams",
    "FsReadParams",
    "FsReadResult",
    "FsRemoveParams",
    "FsStatParams",
    "FsWriteParams",
    "FsWriteResult",
    "NetAcceptParams",
    "NetChangeParams",
    "NetDirectParams",
    "NetLogResult",
    "ProcessExitParams",
    "ProcessOutputParams",
    "ProcessResizeParams",
    "ProcessSignalParams",
    "ProcessStartParams",
    "ProcessStartResult",
    "ProcessWaitParams",
    "ProcessWaitResult",
    "ProcessWriteStdinParams",
    "PtySize",
    "SandboxInfoResult",
    "SnapshotListResult",
    "SnapshotPathResult",
    "SnapshotTagParams",
    "StreamAckParams",
    "StreamCloseParams",
    "StreamDataParams",
    "StreamEofParams",
    "TarDownloadParams",
    "TarUploadParams",
    "TransferReadParams",
    "TransferReadResult",
    "TransferResult",
    "TransferWriteParams",
    "TransferWriteResult",
]

PROTOCOL_VERSION = "1.3"

#: Error codes the agent may return, and what they mean. The host maps them to exceptions
#: through a fixed table (``stockade.agent.client``); anything else is an ``AgentError``.
ERROR_CODES: dict[int, str] = {
    -32700: "parse error",
    -32600: "invalid request",
    -32601: "method not found",
    -32602: "invalid params",
    -32603: "internal error",
    1: "no such file or directory",
    2: "permission denied",
    3: "file exists",
    4: "not a directory",
    5: "is a directory",
    6: "no such process",
    7: "too large",
    8: "i/o error",
    9: "directory not empty",
    10: "busy or limit reached",
}

#: Unacknowledged bytes in flight per stream and direction unless agent.hello agreed on more.
STREAM_WINDOW = 256 * 1024
#: The largest window either side may ask for in agent.hello.
MAX_STREAM_WINDOW = 16 * 1024 * 1024

B64 = Annotated[str, Field(description="Base64-encoded bytes.", max_length=12 * 1024 * 1024)]
Path = Annotated[
    str, Field(description="Absolute path inside the sandbox.", min_length=1, max_length=4096)
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class Empty(_Model):
    """No parameters / no result."""


# --- agent.* -----------------------------------------------------------------------------


class AgentHelloParams(_Model):
    protocol: str = Field(description="Protocol version the host speaks, MAJOR.MINOR.")
    client: str = Field(default="stockade", description="Name and version of the host client.")
    stream_binary: bool = Field(
        default=False,
        description="The host reads binary stream frames (1.2): the agent may send tunnel "
        "data that way instead of as stream.data notifications.",
    )
    stream_window: int = Field(
        default=STREAM_WINDOW,
        ge=STREAM_WINDOW,
        le=MAX_STREAM_WINDOW,
        description="Unacknowledged bytes per stream the agent may send the host (1.2; the "
        "host's receive buffer per stream).",
    )
    stream_fd: bool = Field(
        default=False,
        description="The host reads file descriptors on the channel (1.3; a UNIX socket "
        "shared with the host kernel): the agent may hand each accepted connection's socket "
        "to the host with net.accept instead of relaying its bytes as stream frames.",
    )


class AgentHelloResult(_Model):
    protocol: str = Field(description="Protocol version the agent speaks, MAJOR.MINOR.")
    agent_version: str = Field(description="Version of the guest agent program.")
    capabilities: list[str] = Field(
        description="Optional features the agent supports, e.g. 'pty', 'landlock', 'tar'."
    )
    pid: int = Field(description="Process id of the agent inside the sandbox.")
    uid: int = Field(description="User id the agent runs as inside the sandbox.")
    kernel: str = Field(description="Kernel release seen inside the sandbox (uname -r).")
    hostname: str = Field(description="Hostname seen inside the sandbox.")
    python: str = Field(description="Version of the Python interpreter running the agent.")
    landlock_abi: int = Field(
        default=0, description="Landlock ABI the agent enforced at start; 0 when none."
    )
    stream_window: int = Field(
        default=STREAM_WINDOW,
        ge=STREAM_WINDOW,
        le=MAX_STREAM_WINDOW,
        description="Unacknowledged bytes per stream the host may send the agent (1.2; the "
        "agent's receive buffer per stream). Binary stream frames are used in both "
        "directions when the host offered them and 'stream-binary' is in capabilities.",
    )


# --- process.* ---------------------------------------------------------------------------


class PtySize(_Model):
    rows: int = Field(default=24, ge=1, le=10000, description="Terminal rows.")
    cols: int = Field(default=80, ge=1, le=10000, description="Terminal columns.")


class ProcessStartParams(_Model):
    argv: list[str] | None = Field(
        default=None, description="Program and arguments; exclusive with 'shell'."
    )
    shell: str | None = Field(
        default=None, description="Command line run by /bin/sh -c; exclusive with 'argv'."
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Variables added to the sandbox's base environment."
    )
    cwd: str | None = Field(default=None, description="Working directory; default the workspace.")
    stdin: bool = Field(
        default=False,
        description="Keep stdin open for process.write_stdin; otherwise stdin is /dev/null.",
    )
    pty: PtySize | None = Field(
        default=None, description="Run on a new pseudo-terminal of this size (stdout only)."
    )
    timeout: float | None = Field(
        default=None, gt=0, description="Seconds before the agent kills the process group."
    )


class ProcessStartResult(_Model):
    proc: int = Field(description="Agent-assigned handle of the process, unique per agent.")
    pid: int = Field(description="Process id inside the sandbox.")


class ProcessWriteStdinParams(_Model):
    proc: int = Field(description="Process handle.")
    data: B64 = ""
    eof: bool = Field(default=False, description="Close stdin after writing 'data'.")


class ProcessSignalParams(_Model):
    proc: int = Field(description="Process handle.")
    signal: int = Field(ge=1, le=64, description="Signal number.")
    group: bool = Field(default=True, description="Signal the whole process group.")


class ProcessResizeParams(_Model):
    proc: int = Field(description="Process handle of a PTY process.")
    rows: int = Field(ge=1, le=10000, description="Terminal rows.")
    cols: int = Field(ge=1, le=10000, description="Terminal columns.")


class ProcessWaitParams(_Model):
    proc: int = Field(description="Process handle.")


class ProcessWaitResult(_Model):
    exit_code: int | None = Field(description="Exit status, or None when killed by a signal.")
    signal: int | None = Field(default=None, description="Signal that killed the process.")
    timed_out: bool = Field(default=False, description="Killed because 'timeout' expired.")


class ProcessOutputParams(_Model):
    """Notification: a chunk of output. All chunks of a process precede its process.exit."""

    proc: int = Field(description="Process handle.")
    stream: Literal["stdout", "stderr"] = Field(description="Which stream the bytes came from.")
    data: B64


class ProcessExitParams(ProcessWaitResult):
    """Notification: the process ended and its output is fully delivered."""

    proc: int = Field(description="Process handle.")


# --- fs.* --------------------------------------------------------------------------------


class FsPathParams(_Model):
    path: Path


class FsReadParams(_Model):
    path: Path
    offset: int = Field(default=0, ge=0, description="Byte offset to start reading at.")
    length: int = Field(
        default=1024 * 1024, ge=0, le=4 * 1024 * 1024, description="Most bytes to return."
    )


class FsReadResult(_Model):
    data: B64
    size: int = Field(description="Total size of the file in bytes.")
    eof: bool = Field(description="True when the read reached the end of the file.")


class FsWriteParams(_Model):
    path: Path
    data: B64
    append: bool = Field(default=False, description="Append instead of truncating.")
    mode: int | None = Field(
        default=None, ge=0, le=0o7777, description="Permission bits for a new file."
    )
    parents: bool = Field(default=True, description="Create missing parent directories.")


class FsWriteResult(_Model):
    size: int = Field(description="File size after the write.")


class FsStatParams(_Model):
    path: Path
    follow_symlinks: bool = Field(default=False, description="Stat the symlink's target.")


class FsEntry(_Model):
    path: str = Field(description="Absolute path inside the sandbox.")
    name: str = Field(description="Last path component.")
    type: Literal["file", "dir", "symlink", "other"] = Field(description="File type.")
    size: int = Field(description="Size in bytes.")
    mode: int = Field(description="Permission bits.")
    mtime: float = Field(description="Modification time, seconds since the epoch.")
    target: str | None = Field(default=None, description="Symlink target, for symlinks.")


class FsListParams(_Model):
    path: Path
    depth: int = Field(default=1, ge=1, le=64, description="How many levels to descend.")


class FsListResult(_Model):
    entries: list[FsEntry] = Field(description="Entries in the directory, sorted by path.")


class FsRemoveParams(_Model):
    path: Path
    recursive: bool = Field(default=False, description="Remove directories and their contents.")


class FsMkdirParams(_Model):
    path: Path
    parents: bool = Field(default=True, description="Create missing parents; no error if exists.")
    mode: int = Field(default=0o755, ge=0, le=0o7777, description="Permission bits.")


# --- tar transfers (fs.upload_tar / fs.download_tar, then transfer.*) ---------------------


class TarUploadParams(_Model):
    path: Path = Field(description="Directory to extract into (created if missing).")


class TarDownloadParams(_Model):
    path: Path = Field(description="File or directory to pack.")


class TransferResult(_Model):
    transfer: int = Field(description="Handle for transfer.read / transfer.write.")


class TransferWriteParams(_Model):
    transfer: int = Field(description="Handle from fs.upload_tar.")
    data: B64 = ""
    eof: bool = Field(default=False, description="Last chunk: finish extracting.")


class TransferWriteResult(_Model):
    files: int = Field(default=0, description="Members extracted; set on the eof write.")


class TransferReadParams(_Model):
    transfer: int = Field(description="Handle from fs.download_tar.")
    length: int = Field(default=1024 * 1024, ge=1, le=4 * 1024 * 1024, description="Most bytes.")


class TransferReadResult(_Model):
    data: B64
    eof: bool = Field(description="True when the archive is complete.")


# --- egress tunnel (net.* / stream.*), both directions, all notifications -------------------
#
# The agent listens inside the sandbox (an HTTP/SOCKS proxy port and one local port per raw
# TCP rule) and announces each accepted connection with net.accept. Bytes then flow as
# stream.data notifications, or binary stream frames once agent.hello agreed on them, in
# both directions. Flow control: a sender keeps at most the receiver's window of a stream
# unacknowledged (STREAM_WINDOW, or what agent.hello set: the host's in its params, the
# agent's in its result); the receiver sends stream.ack once it has delivered bytes (written
# them to the socket or handed them on). Exceeding the window is a protocol violation.
# stream.eof half-closes (no more data from the sender); stream.close ends the stream in
# both directions.


class NetAcceptParams(_Model):
    """Notification (agent -> host): a connection was accepted inside the sandbox."""

    stream: int = Field(ge=1, description="Agent-assigned stream id, unique per agent.")
    kind: Literal["proxy", "forward"] = Field(
        description="'proxy': the client speaks HTTP proxy or SOCKS5 on the stream; "
        "'forward': a raw TCP forward to 'target'."
    )
    target: str | None = Field(
        default=None, description="host:port of a raw TCP forward (kind 'forward')."
    )
    peer: str = Field(default="", description="Client address inside the sandbox.")
    fd: bool = Field(
        default=False,
        description="The connection's socket itself is attached to this frame (SCM_RIGHTS, "
        "1.3, only after agent.hello agreed on 'stream-fd'); no stream.* traffic follows and "
        "the stream id is only a name for it.",
    )


class NetDirectParams(_Model):
    """Notification (agent -> host, protocol 1.2): the sandbox tried a direct connection.

    The network namespace sends every TCP connection to a non-loopback address to the agent,
    which answers it with the policy's refusal and reports it here (for the connection log
    and the audit); nothing is tunnelled.
    """

    target: str = Field(max_length=300, description="host:port the sandbox tried to reach.")
    peer: str = Field(default="", max_length=300, description="Client address inside.")


class StreamDataParams(_Model):
    """Notification (both directions): bytes of a stream."""

    stream: int = Field(ge=1, description="Stream id.")
    data: B64


class StreamAckParams(_Model):
    """Notification (both directions): the receiver delivered this many more bytes."""

    stream: int = Field(ge=1, description="Stream id.")
    bytes: int = Field(ge=1, le=MAX_STREAM_WINDOW, description="Bytes delivered since last ack.")


class StreamEofParams(_Model):
    """Notification (both directions): the sender will send no more data (half-close)."""

    stream: int = Field(ge=1, description="Stream id.")


class StreamCloseParams(_Model):
    """Notification (both directions): the stream is gone in both directions."""

    stream: int = Field(ge=1, description="Stream id.")
    error: str | None = Field(default=None, description="Why, when it ended abnormally.")


#: method name -> (params model, result model)
# --- supervisor control methods ----------------------------------------------------------
# A supervisor's control socket speaks this protocol: it relays ``process.*``, ``fs.*`` and
# ``transfer.*`` to the sandbox's agent, answers ``agent.hello`` with the agent's handshake,
# and serves ``CONTROL_METHODS`` itself (``stockade.supervisor``).


class SandboxInfoResult(_Model):
    """sandbox.info: what the supervisor runs."""

    name: str
    id: str
    backend: str
    pid: int = Field(description="The supervisor's process id.")
    policy_hash: str
    agent: AgentHelloResult | None = Field(default=None, description="The agent's handshake.")


class NetChangeParams(_Model):
    """net.allow / net.deny: one policy entry, from now on."""

    entry: str = Field(min_length=1, description="A host, wildcard, address or CIDR (:port).")


class NetLogResult(_Model):
    """net.log: every connection so far, oldest first."""

    connections: list[dict[str, Any]] = Field(
        description="time, sandbox, kind, host, port, addresses, decision, rule, reason, "
        "bytes_up, bytes_down, duration (stockade.egress.log.ConnectionRecord)"
    )


class SnapshotTagParams(_Model):
    """snapshot.take / snapshot.restore."""

    tag: str = Field(min_length=1, max_length=64)


class SnapshotPathResult(_Model):
    """snapshot.take: where the snapshot was saved."""

    path: str


class SnapshotListResult(_Model):
    """snapshot.list: the snapshots of the sandbox (their meta.json), by tag."""

    snapshots: list[dict[str, Any]]


#: control method -> (params model, result model), served by the supervisor itself
CONTROL_METHODS: dict[str, tuple[type[BaseModel], type[BaseModel]]] = {
    "sandbox.info": (Empty, SandboxInfoResult),
    "sandbox.stop": (Empty, Empty),
    "workspace.reset": (Empty, Empty),
    "workspace.sync": (Empty, Empty),
    "net.allow": (NetChangeParams, Empty),
    "net.deny": (NetChangeParams, Empty),
    "net.log": (Empty, NetLogResult),
    "snapshot.take": (SnapshotTagParams, SnapshotPathResult),
    "snapshot.restore": (SnapshotTagParams, Empty),
    "snapshot.list": (Empty, SnapshotListResult),
}

METHODS: dict[str, tuple[type[BaseModel], type[BaseModel]]] = {
    "agent.hello": (AgentHelloParams, AgentHelloResult),
    "agent.shutdown": (Empty, Empty),
    "process.start": (ProcessStartParams, ProcessStartResult),
    "process.write_stdin": (ProcessWriteStdinParams, Empty),
    "process.signal": (ProcessSignalParams, Empty),
    "process.resize": (ProcessResizeParams, Empty),
    "process.wait": (ProcessWaitParams, ProcessWaitResult),
    "fs.read": (FsReadParams, FsReadResult),
    "fs.write": (FsWriteParams, FsWriteResult),
    "fs.stat": (FsStatParams, FsEntry),
    "fs.list": (FsListParams, FsListResult),
    "fs.remove": (FsRemoveParams, Empty),
    "fs.mkdir": (FsMkdirParams, Empty),
    "fs.upload_tar": (TarUploadParams, TransferResult),
    "fs.download_tar": (TarDownloadParams, TransferResult),
    "transfer.write": (TransferWriteParams, TransferWriteResult),
    "transfer.read": (TransferReadParams, TransferReadResult),
}

#: notification name -> params model (agent -> host)
NOTIFICATIONS: dict[str, type[BaseModel]] = {
    "process.output": ProcessOutputParams,
    "process.exit": ProcessExitParams,
    "net.accept": NetAcceptParams,
    "net.direct": NetDirectParams,
    "stream.data": StreamDataParams,
    "stream.ack": StreamAckParams,
    "stream.eof": StreamEofParams,
    "stream.close": StreamCloseParams,
}

#: notifications the host sends to the agent
HOST_NOTIFICATIONS: dict[str, type[BaseModel]] = {
    "stream.data": StreamDataParams,
    "stream.ack": StreamAckParams,
    "stream.eof": StreamEofParams,
    "stream.close": StreamCloseParams,
}
