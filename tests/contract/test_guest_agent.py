"""The guest agent, run as a plain subprocess on the host and spoken to over pipes.

Every answer and notification is validated against the protocol models by the harness
(``tests/agent_harness.py``), which also enforces the ordering rules of the protocol.
"""

from __future__ import annotations

import base64
import io
import os
import select
import signal
import socket
import subprocess
import sys
import tarfile
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_harness import (
    GUEST,
    GUEST_PYTHON,
    AgentCallError,
    AgentHarness,
    pid_alive,
    wait_pid_gone,
)
from stockade.protocol.framing import HEADER, FrameDecoder, encode_frame
from stockade.protocol.messages import PROTOCOL_VERSION, AgentHelloResult

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    root.mkdir()
    return root


@pytest.fixture
def agent(workspace: Path) -> Iterator[AgentHarness]:
    harness = AgentHarness("--workspace", str(workspace))
    harness.hello()
    try:
        yield harness
    finally:
        status = harness.close()
        assert status == 0, "the agent should exit cleanly at EOF"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- agent.* -----------------------------------------------------------------------------


def test_hello_reports_the_agent(workspace: Path) -> None:
    with AgentHarness("--workspace", str(workspace)) as harness:
        hello = harness.hello()
        assert hello["protocol"] == PROTOCOL_VERSION
        assert {"pty", "tar", "signals"} <= set(hello["capabilities"])
        assert "landlock" not in hello["capabilities"]
        assert hello["landlock_abi"] == 0
        assert hello["pid"] == harness.process.pid
        assert hello["uid"] == os.getuid()
        assert hello["kernel"] == os.uname().release
        if sys.executable == GUEST_PYTHON:
            assert hello["python"] == ".".join(map(str, sys.version_info[:3]))


def test_startup_needs_no_heavy_modules(workspace: Path) -> None:
    """Up to the hello answer, no json/re/enum/typing (startup time is benchmarked)."""
    harness = AgentHarness("--workspace", str(workspace), python_flags=("-X", "importtime"))
    harness.hello()
    assert harness.close() == 0
    imported = {
        line.split("|")[-1].strip()
        for line in harness.log_text.splitlines()
        if line.startswith("import time:")
    }
    assert "binascii" in imported  # the probe works
    assert not {"json", "re", "enum", "signal", "typing", "tarfile", "argparse"} & imported


def test_shutdown_kills_children(workspace: Path) -> None:
    harness = AgentHarness("--workspace", str(workspace))
    harness.hello()
    proc = harness.start(shell="sleep 30 & echo $!; wait")
    harness.until(lambda: harness.procs[proc].stdout.endswith(b"\n"), "the sleep's pid")
    sleeper = int(harness.procs[proc].stdout)
    assert harness.call("agent.shutdown") == {}
    assert harness.wait_gone() == 0
    wait_pid_gone(sleeper)
    harness.close()


def test_eof_on_the_channel_kills_children_and_exits(workspace: Path) -> None:
    harness = AgentHarness("--workspace", str(workspace))
    harness.hello()
    proc = harness.start(shell="sleep 30 & echo $!; wait")
    harness.until(lambda: harness.procs[proc].stdout.endswith(b"\n"), "the sleep's pid")
    sleeper = int(harness.procs[proc].stdout)
    assert pid_alive(sleeper)
    assert harness.close() == 0
    wait_pid_gone(sleeper)


def test_malformed_json_from_the_host_ends_the_agent(workspace: Path) -> None:
    harness = AgentHarness("--workspace", str(workspace))
    body = b"{not json"
    harness.send_bytes(HEADER.pack(len(body)) + body)
    assert harness.wait_gone() != 0
    assert "not JSON" in harness.stderr()
    harness.close()


def test_oversized_frame_from_the_host_ends_the_agent(workspace: Path) -> None:
    harness = AgentHarness("--workspace", str(workspace), "--max-frame", "4096")
    harness.send_bytes(HEADER.pack(5000) + b"{")
    assert harness.wait_gone() != 0
    assert "limit" in harness.stderr()
    harness.close()


def test_bad_params_and_unknown_methods(agent: AgentHarness) -> None:
    error = agent.error("process.start", {"argv": 5})
    assert error.code == -32602
    assert "'argv'" in error.message
    error = agent.error("process.start", {"argv": ["true"], "shell": "true"})
    assert error.code == -32602
    error = agent.error("fs.read", {})
    assert error.code == -32602
    assert "'path'" in error.message
    error = agent.error("fs.read", {"path": "/etc/hostname", "length": -1})
    assert error.code == -32602
    assert "'length'" in error.message
    error = agent.error("fs.stat", {"path": "/", "user": "root"})
    assert error.code == -32602
    assert "'user'" in error.message
    error = agent.error("process.signal", {"proc": 1, "signal": True})
    assert error.code == -32602
    error = agent.error("no.such.method", {})
    assert error.code == -32601
    answer = agent.answer(agent.request("fs.stat", [], check_params=False))  # type: ignore[arg-type]
    assert answer["error"]["code"] == -32602
    # The agent survives all of this.
    assert agent.hello()["protocol"] == PROTOCOL_VERSION


# --- process.* ---------------------------------------------------------------------------


def test_argv_and_shell_exit_codes(agent: AgentHarness) -> None:
    exit_params, _, _ = agent.run(argv=["/bin/sh", "-c", "exit 7"])
    assert exit_params == {
        "proc": exit_params["proc"],
        "exit_code": 7,
        "signal": None,
        "timed_out": False,
    }
    exit_params, out, _ = agent.run(argv=["echo", "found", "on", "PATH"])
    assert exit_params["exit_code"] == 0
    assert out == b"found on PATH\n"
    exit_params, out, _ = agent.run(shell="echo $((6 * 7)); exit 3")
    assert (exit_params["exit_code"], out) == (3, b"42\n")


def test_exec_failures_are_errors(agent: AgentHarness, workspace: Path) -> None:
    with pytest.raises(AgentCallError) as missing:
        agent.start(argv=["/no/such/program"])
    assert missing.value.code == 1
    with pytest.raises(AgentCallError) as bad_cwd:
        agent.start(argv=["true"], cwd=str(workspace / "missing"))
    assert bad_cwd.value.code == 1
    assert "cwd" in bad_cwd.value.message
    (workspace / "script").write_text("#!/bin/sh\n")
    with pytest.raises(AgentCallError) as not_executable:
        agent.start(argv=[str(workspace / "script")])
    assert not_executable.value.code == 2


def test_env_cwd_and_stdin_default(agent: AgentHarness, workspace: Path) -> None:
    (workspace / "sub").mkdir()
    exit_params, out, _ = agent.run(
        shell='echo "$GREETING"; pwd; cat; echo done',
        env={"GREETING": "hi there"},
        cwd="sub",
    )
    assert exit_params["exit_code"] == 0
    assert out == f"hi there\n{workspace / 'sub'}\ndone\n".encode()
    _, out, _ = agent.run(argv=["pwd"])
    assert out == f"{workspace}\n".encode()


def test_stdout_and_stderr_are_separate_and_complete(agent: AgentHarness) -> None:
    exit_params, out, err = agent.run(
        shell="for i in 1 2 3; do echo out$i; echo err$i >&2; done; exit 1"
    )
    assert exit_params["exit_code"] == 1
    assert out == b"out1\nout2\nout3\n"
    assert err == b"err1\nerr2\nerr3\n"


def test_large_output_arrives_intact(agent: AgentHarness) -> None:
    size = 20 * 1024 * 1024
    program = (
        "import sys\n"
        "block = bytes(range(256)) * 4096\n"
        f"for i in range({size} // len(block)):\n"
        "    sys.stdout.buffer.write(bytes([i % 251]) + block[1:])\n"
        "sys.stderr.write('done')\n"
    )
    exit_params, out, err = agent.run(argv=[sys.executable, "-S", "-I", "-c", program])
    assert exit_params["exit_code"] == 0
    assert err == b"done"
    assert len(out) == size
    block = bytes(range(256)) * 4096
    for i in range(size // len(block)):
        chunk = out[i * len(block) : (i + 1) * len(block)]
        assert chunk[0] == i % 251 and chunk[1:] == block[1:], f"block {i} differs"


def test_backpressure_stops_reading_children(agent: AgentHarness) -> None:
    """While the host does not read, the agent stops reading the child: memory stays bounded."""
    size = 64 * 1024 * 1024
    started = agent.call("process.start", argv=["head", "-c", str(size), "/dev/zero"])
    proc, pid = started["proc"], started["pid"]
    # Nobody reads the channel now. Without backpressure the agent would swallow all 64 MiB
    # and the child would finish; with it, the child ends up blocked writing its pipe.
    blocked = 0
    while blocked < 20:
        assert pid_alive(pid), "the child finished although nobody read its output"
        with open(f"/proc/{pid}/wchan") as handle:
            blocked = blocked + 1 if "pipe_write" in handle.read() else 0
        time.sleep(0.01)
    with open(f"/proc/{agent.process.pid}/status") as handle:
        rss_kib = next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))
    assert rss_kib < 48 * 1024, f"the agent holds {rss_kib} KiB"
    exit_params = agent.wait_exit(proc)
    assert exit_params["exit_code"] == 0
    assert len(agent.procs[proc].stdout) == size


def test_stdin_streams_and_eof_closes_it(agent: AgentHarness) -> None:
    proc = agent.start(argv=["cat"], stdin=True)
    agent.write_stdin(proc, b"hello ")
    agent.until(lambda: agent.procs[proc].stdout == b"hello ", "the first echo")
    agent.write_stdin(proc, b"world\n" * 50000)  # more than a pipe buffer
    agent.write_stdin(proc, eof=True)
    exit_params = agent.wait_exit(proc)
    assert exit_params["exit_code"] == 0
    assert bytes(agent.procs[proc].stdout) == b"hello " + b"world\n" * 50000
    closed = agent.error("process.write_stdin", {"proc": proc, "data": b64(b"late")})
    assert closed.code == 6  # the process has exited


def test_write_stdin_errors(agent: AgentHarness) -> None:
    proc = agent.start(argv=["sleep", "30"])  # stdin is /dev/null
    error = agent.error("process.write_stdin", {"proc": proc, "data": b64(b"x")})
    assert error.code == -32602
    agent.call("process.signal", proc=proc, signal=signal.SIGKILL)
    agent.wait_exit(proc)
    error = agent.error("process.write_stdin", {"proc": 999, "data": b64(b"x")})
    assert error.code == 6
    proc = agent.start(argv=["cat"], stdin=True)
    agent.write_stdin(proc, eof=True)
    error = agent.error("process.write_stdin", {"proc": proc, "data": b64(b"x")})
    assert error.code in (6, 8)
    agent.wait_exit(proc)


def test_signals_reach_the_process(agent: AgentHarness) -> None:
    proc = agent.start(
        shell="trap 'echo got TERM; exit 9' TERM; echo ready; while :; do sleep 0.05; done"
    )
    agent.until(lambda: b"ready" in agent.procs[proc].stdout, "the trap to be set")
    assert agent.call("process.signal", proc=proc, signal=signal.SIGTERM, group=False) == {}
    exit_params = agent.wait_exit(proc)
    assert exit_params["exit_code"] == 9
    assert b"got TERM" in agent.procs[proc].stdout

    proc = agent.start(argv=["sleep", "30"])
    agent.call("process.signal", proc=proc, signal=signal.SIGKILL)
    exit_params = agent.wait_exit(proc)
    assert (exit_params["exit_code"], exit_params["signal"]) == (None, signal.SIGKILL)
    error = agent.error("process.signal", {"proc": proc, "signal": 15})
    assert error.code == 6
    error = agent.error("process.signal", {"proc": 12345, "signal": 15})
    assert error.code == 6


def test_timeout_kills_the_whole_group(agent: AgentHarness) -> None:
    proc = agent.start(shell="sleep 30 & echo $!; wait", timeout=0.5)
    exit_params = agent.wait_exit(proc)
    assert exit_params["timed_out"] is True
    assert exit_params["signal"] == signal.SIGKILL
    assert exit_params["exit_code"] is None
    wait_pid_gone(int(agent.procs[proc].stdout))


def test_background_grandchild_does_not_block_exit(agent: AgentHarness) -> None:
    exit_params, out, _ = agent.run(shell="sleep 30 & echo $!")
    assert exit_params["exit_code"] == 0
    sleeper = int(out)
    assert pid_alive(sleeper)  # it still holds stdout open; the exit came anyway
    agent.close()
    wait_pid_gone(sleeper)  # the agent (a subreaper) took it down on its way out


def test_wait_is_repeatable_and_works_after_exit(agent: AgentHarness) -> None:
    proc = agent.start(argv=["sleep", "0.2"])
    first = agent.request("process.wait", {"proc": proc})
    second = agent.request("process.wait", {"proc": proc})
    agent._wait_targets.update({first: proc, second: proc})
    assert agent.answer(first)["result"] == agent.answer(second)["result"]
    assert agent.call("process.wait", proc=proc)["exit_code"] == 0
    assert agent.error("process.wait", {"proc": 4242}).code == 6


def test_pty(agent: AgentHarness) -> None:
    proc = agent.start(
        shell="test -t 0 && test -t 1 && echo IS-A-TTY; stty size; read line; stty size",
        pty={"rows": 30, "cols": 100},
    )
    record = agent.procs[proc]
    agent.until(lambda: b"30 100" in record.stdout, "the first stty size")
    assert b"IS-A-TTY" in record.stdout
    assert agent.call("process.resize", proc=proc, rows=40, cols=120) == {}
    agent.write_stdin(proc, b"typed\n")
    exit_params = agent.wait_exit(proc)
    assert exit_params["exit_code"] == 0
    assert b"40 120" in record.stdout
    assert record.stderr == b""  # a pty has one stream
    no_pty = agent.start(argv=["sleep", "30"])
    error = agent.error("process.resize", {"proc": no_pty, "rows": 1, "cols": 1})
    assert error.code == -32602
    agent.call("process.signal", proc=no_pty, signal=signal.SIGKILL)
    agent.wait_exit(no_pty)


# --- fs.* --------------------------------------------------------------------------------


def test_fs_write_read_stat(agent: AgentHarness, workspace: Path) -> None:
    result = agent.call("fs.write", path="deep/dir/file.txt", data=b64(b"hello"), mode=0o600)
    assert result == {"size": 5}
    target = workspace / "deep" / "dir" / "file.txt"
    assert target.read_bytes() == b"hello"
    assert target.stat().st_mode & 0o777 == 0o600
    assert agent.call("fs.write", path=str(target), data=b64(b" world"), append=True) == {
        "size": 11
    }

    read = agent.call("fs.read", path=str(target))
    assert (base64.b64decode(read["data"]), read["size"], read["eof"]) == (b"hello world", 11, True)
    read = agent.call("fs.read", path=str(target), offset=6, length=3)
    assert (base64.b64decode(read["data"]), read["eof"]) == (b"wor", False)
    read = agent.call("fs.read", path=str(target), offset=6, length=100)
    assert (base64.b64decode(read["data"]), read["eof"]) == (b"world", True)

    stat = agent.call("fs.stat", path="deep/dir/file.txt")
    assert stat["path"] == str(target)
    assert (stat["name"], stat["type"], stat["size"], stat["mode"]) == (
        "file.txt",
        "file",
        11,
        0o600,
    )
    os.symlink("file.txt", workspace / "deep" / "dir" / "link")
    stat = agent.call("fs.stat", path=str(workspace / "deep" / "dir" / "link"))
    assert (stat["type"], stat["target"]) == ("symlink", "file.txt")
    stat = agent.call(
        "fs.stat", path=str(workspace / "deep" / "dir" / "link"), follow_symlinks=True
    )
    assert (stat["type"], stat["size"]) == ("file", 11)

    error = agent.error("fs.write", {"path": "nowhere/x", "data": "", "parents": False})
    assert error.code == 1


def test_fs_error_codes(agent: AgentHarness, workspace: Path) -> None:
    (workspace / "file").write_text("x")
    (workspace / "full").mkdir()
    (workspace / "full" / "inner").write_text("x")
    cases: list[tuple[str, dict[str, object], int]] = [
        ("fs.read", {"path": "missing"}, 1),
        ("fs.stat", {"path": "missing"}, 1),
        ("fs.read", {"path": "full"}, 5),
        ("fs.list", {"path": "file"}, 4),
        ("fs.mkdir", {"path": "full", "parents": False}, 3),
        ("fs.mkdir", {"path": "file/sub"}, 4),
        ("fs.remove", {"path": "full"}, 9),
        ("fs.remove", {"path": "missing"}, 1),
        ("fs.write", {"path": "full", "data": ""}, 5),
    ]
    for method, params, code in cases:
        error = agent.error(method, params, check_params=True)
        assert error.code == code, (method, params, error.message)


def test_fs_list_mkdir_remove(agent: AgentHarness, workspace: Path) -> None:
    assert agent.call("fs.mkdir", path="a/b/c") == {}
    assert agent.call("fs.mkdir", path="a/b/c") == {}  # parents=True: no error if it exists
    assert agent.call("fs.mkdir", path="a/m", parents=False, mode=0o700) == {}
    assert (workspace / "a" / "m").stat().st_mode & 0o777 == 0o700
    (workspace / "a" / "b" / "f.txt").write_text("12345")
    (workspace / "outside").mkdir()
    (workspace / "outside" / "secret").write_text("x")
    os.symlink(workspace / "outside", workspace / "a" / "link")

    one = agent.call("fs.list", path="a")["entries"]
    assert [e["name"] for e in one] == ["b", "link", "m"]
    assert [e["type"] for e in one] == ["dir", "symlink", "dir"]
    deep = agent.call("fs.list", path=str(workspace / "a"), depth=5)["entries"]
    paths = [e["path"] for e in deep]
    assert paths == sorted(paths)
    assert str(workspace / "a" / "b" / "f.txt") in paths
    assert not any("secret" in p for p in paths)  # symlinked dirs are not followed
    sizes = {e["name"]: e["size"] for e in deep}
    assert sizes["f.txt"] == 5

    assert agent.call("fs.remove", path="a/b/f.txt") == {}
    assert agent.call("fs.remove", path="a/link", recursive=True) == {}
    assert (workspace / "outside" / "secret").exists()  # removing a link never follows it
    assert agent.call("fs.remove", path="a/m") == {}  # an empty directory
    assert agent.call("fs.remove", path="a", recursive=True) == {}
    assert not (workspace / "a").exists()


# --- tar transfers -----------------------------------------------------------------------


def make_tar(members: list[tuple[str, bytes | None, str | None]]) -> bytes:
    """(name, data or None for a directory, symlink target or None)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                archive.addfile(info)
            elif data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                archive.addfile(info)
            else:
                info.size, info.mode = len(data), 0o640
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def upload(agent: AgentHarness, path: str, data: bytes, chunk: int = 100_000) -> dict[str, object]:
    transfer = agent.call("fs.upload_tar", path=path)["transfer"]
    for start in range(0, len(data), chunk):
        assert agent.call(
            "transfer.write", transfer=transfer, data=b64(data[start : start + chunk])
        ) == {"files": 0}
    return agent.call("transfer.write", transfer=transfer, eof=True)


def test_tar_round_trip(agent: AgentHarness, workspace: Path) -> None:
    big = os.urandom(600_000)
    archive = make_tar(
        [
            ("pkg", None, None),
            ("pkg/big.bin", big, None),
            ("pkg/sub/small.txt", b"small\n", None),
            ("pkg/current", None, "sub/small.txt"),
            ("./top.txt", b"top", None),
        ]
    )
    assert upload(agent, "dest", archive) == {"files": 5}
    dest = workspace / "dest"
    assert (dest / "pkg" / "big.bin").read_bytes() == big
    assert (dest / "pkg" / "big.bin").stat().st_mode & 0o777 == 0o640
    assert (dest / "pkg" / "current").read_bytes() == b"small\n"
    assert os.readlink(dest / "pkg" / "current") == "sub/small.txt"

    transfer = agent.call("fs.download_tar", path="dest")["transfer"]
    data = bytearray()
    while True:
        chunk = agent.call("transfer.read", transfer=transfer, length=65536)
        data += base64.b64decode(chunk["data"])
        if chunk["eof"]:
            break
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as downloaded:
        names = downloaded.getnames()
        assert set(names) == {
            "pkg",
            "pkg/big.bin",
            "pkg/sub",
            "pkg/sub/small.txt",
            "pkg/current",
            "top.txt",
        }
        extracted = downloaded.extractfile("pkg/big.bin")
        assert extracted is not None and extracted.read() == big
        assert downloaded.getmember("pkg/current").linkname == "sub/small.txt"
    error = agent.error("transfer.read", {"transfer": transfer})
    assert error.code == -32602  # finished transfers are gone

    transfer = agent.call("fs.download_tar", path="dest/top.txt")["transfer"]
    chunk = agent.call("transfer.read", transfer=transfer)
    assert chunk["eof"] is True
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(chunk["data"]))) as single:
        assert single.getnames() == ["top.txt"]
    assert agent.error("fs.download_tar", {"path": "missing"}).code == 1


@pytest.mark.parametrize(
    ("member", "link"),
    [("../evil", None), ("/abs/evil", None), ("ok/../../evil", None), ("link", "../../evil")],
)
def test_tar_upload_refuses_escapes(
    agent: AgentHarness, workspace: Path, member: str, link: str | None
) -> None:
    archive = make_tar(
        [
            ("fine.txt", b"fine", None),
            (member, b"evil", link) if link is None else (member, None, link),
        ]
    )
    transfer = agent.call("fs.upload_tar", path="dest")["transfer"]
    agent.call("transfer.write", transfer=transfer, data=b64(archive))
    error = agent.error("transfer.write", {"transfer": transfer, "eof": True})
    assert error.code == 2
    assert "refusing" in error.message
    assert not (workspace / "dest" / "fine.txt").exists()  # nothing extracted at all
    assert not (workspace / "evil").exists() and not (workspace.parent / "evil").exists()


def test_tar_upload_does_not_write_through_symlinks(agent: AgentHarness, workspace: Path) -> None:
    outside = workspace.parent / "outside"
    outside.mkdir()
    (workspace / "dest").mkdir()
    os.symlink(outside, workspace / "dest" / "escape")
    transfer = agent.call("fs.upload_tar", path="dest")["transfer"]
    agent.call("transfer.write", transfer=transfer, data=b64(make_tar([("escape/x", b"x", None)])))
    assert agent.error("transfer.write", {"transfer": transfer, "eof": True}).code == 2
    assert not (outside / "x").exists()


def test_tar_upload_rejects_garbage(agent: AgentHarness) -> None:
    transfer = agent.call("fs.upload_tar", path="dest")["transfer"]
    agent.call("transfer.write", transfer=transfer, data=b64(b"this is not a tar archive" * 100))
    assert agent.error("transfer.write", {"transfer": transfer, "eof": True}).code == 8


# --- options: rlimits, Landlock ----------------------------------------------------------


def test_rlimits_are_inherited(workspace: Path) -> None:
    with AgentHarness(
        "--workspace", str(workspace), "--rlimit", "nofile=64:128", "--rlimit", "core=0"
    ) as harness:
        harness.hello()
        _, out, _ = harness.run(shell="ulimit -n; ulimit -H -n; ulimit -c")
        assert out.split() == [b"64", b"128", b"0"]


def test_unknown_option_is_refused(workspace: Path) -> None:
    result = subprocess.run(
        [GUEST_PYTHON, "-S", "-I", str(GUEST), "--frobnicate"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "--frobnicate" in result.stderr


def raw_hello(sock_or_fd: int) -> dict[str, object]:
    """One agent.hello over a raw descriptor, without the harness."""
    os.write(
        sock_or_fd,
        encode_frame(
            {"jsonrpc": "2.0", "id": 1, "method": "agent.hello", "params": {"protocol": "1.0"}}
        ),
    )
    decoder = FrameDecoder()
    while True:
        ready, _, _ = select.select([sock_or_fd], [], [], 20)
        assert ready, "no answer to agent.hello"
        for message in decoder.feed(os.read(sock_or_fd, 65536)):
            result = message["result"]
            AgentHelloResult.model_validate(result)
            return dict(result)


def test_channel_on_other_descriptors() -> None:
    host, guest = socket.socketpair()
    with host, guest:
        agent = subprocess.Popen(
            [
                GUEST_PYTHON,
                "-S",
                "-I",
                str(GUEST),
                "--fd-in",
                str(guest.fileno()),
                "--fd-out",
                str(guest.fileno()),
            ],
            pass_fds=[guest.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        guest.close()
        assert raw_hello(host.fileno())["pid"] == agent.pid
        host.shutdown(socket.SHUT_WR)
        assert agent.wait(20) == 0


def test_channel_on_a_device() -> None:
    """--device: one character device both ways (a pty stands in for virtio-serial)."""
    master, slave = os.openpty()
    tty.setraw(slave)  # the agent does it too, but frames sent before it starts must not echo
    try:
        # Through /proc: on some hosts the pty's node is not visible under /dev/pts.
        agent = subprocess.Popen(
            [GUEST_PYTHON, "-S", "-I", str(GUEST), "--device", f"/proc/self/fd/{slave}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            pass_fds=[slave],
        )
        os.close(slave)
        assert raw_hello(master)["pid"] == agent.pid  # raw mode: frames pass unchanged
        agent.terminate()  # a device never reaches EOF; SIGTERM ends the agent cleanly
        assert agent.wait(20) == 0
    finally:
        os.close(master)


def landlock_abi() -> int:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return int(libc.syscall(ctypes.c_long(444), None, ctypes.c_long(0), ctypes.c_long(1)))


def test_landlock_confines_writes(tmp_path: Path) -> None:
    abi = landlock_abi()
    if abi < 1:
        pytest.skip(f"this kernel has no Landlock (landlock_create_ruleset answered {abi})")
    rw = tmp_path / "rw"
    rw.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    args = ["--workspace", str(rw), "--landlock", "required", "--landlock-scope"]
    for path in ("/usr", "/bin", "/lib", "/lib64", "/etc", "/proc"):
        args += ["--landlock-ro", path]
    args += ["--landlock-rw", str(rw), "--landlock-ro", "/does/not/exist"]
    with AgentHarness(*args) as harness:
        hello = harness.hello()
        assert hello["landlock_abi"] == abi
        assert "landlock" in hello["capabilities"]

        assert harness.call("fs.write", path=str(rw / "inside.txt"), data=b64(b"ok")) == {"size": 2}
        error = harness.error("fs.write", {"path": str(outside / "nope.txt"), "data": b64(b"no")})
        assert error.code == 2
        assert not (outside / "nope.txt").exists()

        exit_params, _, _ = harness.run(shell=f"echo hi > {rw}/child.txt")
        assert exit_params["exit_code"] == 0
        assert (rw / "child.txt").read_text() == "hi\n"
        exit_params, _, err = harness.run(shell=f"echo hi > {outside}/child.txt")
        assert exit_params["exit_code"] != 0
        assert b"ermission denied" in err
        assert not (outside / "child.txt").exists()
        exit_params, out, _ = harness.run(argv=["cat", "/etc/hostname"])  # ro is readable
        assert exit_params["exit_code"] == 0
        # Tar transfers work under Landlock too (their modules were loaded before it applied).
        assert upload(harness, str(rw / "tree"), make_tar([("a.txt", b"a", None)])) == {"files": 1}
        exit_params, out, _ = harness.run(argv=["cat", "a.txt"], cwd=str(rw / "tree"))
        assert out == b"a"
        proc = harness.start(argv=["sh", "-c", "stty size"], pty={"rows": 5, "cols": 7})
        harness.wait_exit(proc)
        assert b"5 7" in harness.procs[proc].stdout


def test_unknown_landlock_mode_is_refused() -> None:
    result = subprocess.run(
        [GUEST_PYTHON, "-S", "-I", str(GUEST), "--landlock", "sometimes"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
