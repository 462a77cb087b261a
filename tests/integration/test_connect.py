"""``Sandbox.connect``: a second process drives a sandbox the CLI created (commands, files,
workspace diff and apply), ``Sandbox.list`` shows it, closing detaches, ``kill`` stops it.
Runs the real namespace backend (skips with the probe's reason)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

ENV = {"STOCKADE_BACKEND": "namespace"}


def stockade(*args: str, cwd: Path | None = None, check: bool = True) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "stockade.cli.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **ENV},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"stockade {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
    return proc.stdout


def client(script: str, *args: str) -> dict[str, object]:
    """Run ``script`` in a new Python process (the SDK user); it prints one JSON object."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, **ENV},
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


DRIVE = """
import json, sys
from stockade import Sandbox

name = sys.argv[1]
listed = {info.name: info for info in Sandbox.list()}
with Sandbox.connect(name) as sb:
    run = sb.commands.run("cat notes.txt; echo oops >&2; exit 3")
    sb.files.write("made-by-client.txt", "from another process\\n")
    sb.commands.run(["sh", "-c", "echo changed >> notes.txt"], check=True)
    echoed = sb.commands.run(["cat"], background=True, stdin=b"")
    echoed.send_stdin("piped", eof=True)
    diff = sb.workspace.diff()
    applied = sb.workspace.apply(["made-by-client.txt"])
    print(json.dumps({
        "listed": {
            "status": listed[name].status,
            "backend": listed[name].backend,
            "connectable": listed[name].connectable,
            "workspace": str(listed[name].workspace),
        },
        "backend": sb.backend,
        "running": sb.is_running(),
        "stdout": run.stdout,
        "stderr": run.stderr,
        "exit_code": run.exit_code,
        "read": sb.files.read("made-by-client.txt"),
        "stdin": echoed.wait().stdout,
        "diff": sorted((c.kind, c.path) for c in diff),
        "applied": sorted(applied.applied),
    }))
"""


def test_a_second_process_drives_a_cli_created_sandbox(
    namespace_backend: str, project: Path
) -> None:
    name = f"c-{uuid.uuid4().hex[:8]}"
    (project / "notes.txt").write_text("original notes\n")
    stockade("create", "--name", name, "-C", str(project))
    try:
        out = client(DRIVE, name)
        assert out["listed"] == {
            "status": "running",
            "backend": "namespace",
            "connectable": True,
            "workspace": str(project.resolve()),
        }
        assert out["backend"] == "namespace" and out["running"] is True
        assert out["stdout"] == "original notes\n" and out["stderr"] == "oops\n"
        assert out["exit_code"] == 3
        assert out["read"] == "from another process\n"
        assert out["stdin"] == "piped"
        assert out["diff"] == [["added", "made-by-client.txt"], ["modified", "notes.txt"]]
        assert out["applied"] == ["made-by-client.txt"]
        # Applied to the project on the host; the file not named stays in the sandbox only.
        assert (project / "made-by-client.txt").read_text() == "from another process\n"
        assert (project / "notes.txt").read_text() == "original notes\n"
        # Closing the connected handle detached: the sandbox still runs for the CLI.
        assert stockade("exec", name, "--", "cat", "made-by-client.txt") == (
            "from another process\n"
        )
        audit = [json.loads(line) for line in stockade("audit", name, "--json").splitlines()]
        actions = [event["action"] for event in audit]
        assert "file.written" in actions and "workspace.applied" in actions
        # The supervisor records the processes it ran for the client, once each.
        started = [e for e in audit if e["action"] == "process.started"]
        exited = [e for e in audit if e["action"] == "process.exited"]
        assert len(started) == len(exited) == 4  # three of the client, one of `exec`
    finally:
        stockade("rm", "--force", name, check=False)


KILL = """
import json, sys
from stockade import Sandbox, SandboxStateError

with Sandbox.connect(sys.argv[1]) as sb:
    sb.kill()
    try:
        sb.commands.run("true")
    except SandboxStateError as exc:
        error = str(exc)
with Sandbox.connect(sys.argv[1]) as again:
    status = repr(again)
print(json.dumps({"error": error, "status": status}))
"""


def test_kill_stops_a_connected_sandbox_and_a_stopped_one_keeps_its_workspace(
    namespace_backend: str, project: Path
) -> None:
    name = f"c-{uuid.uuid4().hex[:8]}"
    stockade("create", "--name", name, "-C", str(project))
    try:
        stockade("exec", name, "--", "sh", "-c", "echo kept > kept.txt")
        out = client(KILL, name)
        assert "closed" in str(out["error"])
        assert "not running" in str(out["status"])
        rows = json.loads(stockade("ls", "--json"))
        assert next(r["status"] for r in rows if r["name"] == name) == "stopped"
        # A stopped sandbox gives its workspace (review) but runs nothing.
        out = client(
            """
            import json, sys
            from stockade import Sandbox, SandboxStateError
            with Sandbox.connect(sys.argv[1]) as sb:
                changed = [c.path for c in sb.workspace.diff()]
                try:
                    sb.files.read("kept.txt")
                except SandboxStateError as exc:
                    error = str(exc)
            print(json.dumps({"changed": changed, "error": error}))
            """,
            name,
        )
        assert out["changed"] == ["kept.txt"]
        assert "is stopped" in str(out["error"])
    finally:
        stockade("rm", "--force", name, check=False)


def test_connect_names_what_is_there_when_nothing_matches(
    namespace_backend: str, project: Path
) -> None:
    out = client(
        """
        import json
        from stockade import Sandbox, SandboxNotFoundError
        try:
            Sandbox.connect("no-such-sandbox")
        except SandboxNotFoundError as exc:
            print(json.dumps({"error": str(exc)}))
        """
    )
    assert "no-such-sandbox" in str(out["error"])


def test_snapshots_on_a_backend_that_cannot_name_the_one_that_can(
    namespace_backend: str, project: Path
) -> None:
    name = f"c-{uuid.uuid4().hex[:8]}"
    stockade("create", "--name", name, "-C", str(project))
    try:
        out = client(
            """
            import json, sys
            from stockade import Sandbox, SandboxStateError
            with Sandbox.connect(sys.argv[1]) as sb:
                try:
                    sb.snapshot("t1")
                except SandboxStateError as exc:
                    print(json.dumps({"error": str(exc)}))
            """,
            name,
        )
        assert "backend='microvm'" in str(out["error"])
    finally:
        stockade("rm", "--force", name, check=False)


def test_an_exited_unreaped_supervisor_counts_as_stopped() -> None:
    """`rm` waits for a supervisor to exit; one this process started (a fork) and that
    exited is a zombie until reaped, and must not be waited for as if it still ran."""
    from stockade.sandbox.remote import _pid_alive

    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while _pid_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _pid_alive(child.pid)
    assert child.poll() == 0  # it was a zombie until now: only then reaped
    assert _pid_alive(os.getpid())
