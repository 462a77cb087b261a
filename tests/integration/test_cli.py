"""The CLI as a new user drives it: run/diff/apply/reset, supervised sandboxes, kill -9 of a
supervisor, audit, doctor. Runs the real namespace backend (skips with the probe's reason)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from sandbox_helpers import git

pytestmark = pytest.mark.timeout(180)


def stockade(*args: str, cwd: Path | None = None, check: bool = True, timeout: float = 60,
             input: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "stockade.cli.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        # These tests look at the namespace backend's host processes; auto would pick gVisor
        # where runsc works (test_container_backends.py covers the CLI on the others).
        env={"STOCKADE_BACKEND": "namespace", **os.environ},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"stockade {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
    return proc


def on_a_terminal(
    *args: str, keys: bytes = b"", answer: bytes | None = None, timeout: float = 60
) -> tuple[str, int]:
    """Run ``stockade *args`` on a real terminal (a pty): type ``keys`` at once, and
    ``answer`` and Enter once a ``[y/N]`` prompt shows; read until the terminal closes or
    ``timeout`` seconds pass. Returns what it printed and its wait status."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # child: the CLI on a real terminal
        os.execvp(sys.executable, [sys.executable, "-m", "stockade.cli.main", *args])
    if keys:
        os.write(fd, keys)
    output = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
        if answer is not None and b"[y/N]" in output:
            os.write(fd, answer + b"\n")
            answer = None  # answered
    _, status = os.waitpid(pid, 0)
    return output.decode(errors="replace"), status


def pids_with_marker(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def status_of(name: str) -> str:
    rows = json.loads(stockade("ls", "--json").stdout)
    return next(r["status"] for r in rows if r["name"] == name)


def test_run_diff_apply_reset(namespace_backend: str, project: Path) -> None:
    before = sorted(p.name for p in project.iterdir())
    r = stockade("run", "--", "sh", "-c", "echo hi > new.txt; cat /etc/hostname", cwd=project)
    assert r.stdout == "sandbox\n"
    assert "new.txt" in r.stderr  # the summary of changed files
    assert sorted(p.name for p in project.iterdir()) == before  # host unchanged

    diff = stockade("diff", cwd=project).stdout
    assert "+++ b/new.txt" in diff and "+hi" in diff
    as_json = json.loads(stockade("diff", "--json", cwd=project).stdout)
    assert [c["path"] for c in as_json["changes"]] == ["new.txt"]

    stockade("apply", cwd=project)
    assert (project / "new.txt").read_text() == "hi\n"
    assert "no changes" in stockade("diff", cwd=project).stderr

    stockade("run", "--", "sh", "-c", "echo other > other.txt", cwd=project)
    stockade("reset", cwd=project)
    assert "no changes" in stockade("diff", cwd=project).stderr
    assert not (project / "other.txt").exists()


def test_exit_codes_pass_through(namespace_backend: str, project: Path) -> None:
    assert (
        stockade("run", "--rm", "--", "sh", "-c", "exit 7", cwd=project, check=False).returncode
        == 7
    )
    assert stockade("run", "--rm", "--", "true", cwd=project).returncode == 0
    assert stockade("run", "--rm", "--", "cat", cwd=project, input="piped in").stdout == "piped in"
    r = stockade("run", "--rm", "--backend", "nonexistent", "--", "true", cwd=project, check=False)
    assert r.returncode == 125 and "nonexistent" in r.stderr


def test_host_backend_needs_the_flag(project: Path) -> None:
    r = stockade("run", "--rm", "--backend", "host", "--workspace-mode", "rw", "--", "true",
                 cwd=project, check=False)  # fmt: skip
    assert r.returncode == 125 and "unsafe" in r.stderr
    r = stockade("run", "--rm", "--backend", "host", "--unsafe-host", "--workspace-mode", "rw",
                 "--", "sh", "-c", "echo $0", cwd=project)  # fmt: skip
    assert "WARNING" in r.stderr and "NO isolation" in r.stderr


def test_supervised_sandbox_lifecycle(namespace_backend: str, project: Path) -> None:
    name = f"t-{uuid.uuid4().hex[:8]}"
    stockade("create", "--name", name, "-C", str(project))
    try:
        assert status_of(name) == "running"
        r = stockade("exec", name, "--", "sh", "-c", "echo $((6*7)); exit 3", check=False)
        assert (r.returncode, r.stdout) == (3, "42\n")
        stockade("exec", name, "--", "sh", "-c", "echo kept > state.txt")
        assert stockade("exec", name, "--", "cat", "state.txt").stdout == "kept\n"
        assert "state.txt" in stockade("diff", name, "--stat").stdout

        marker = str(10**6 + uuid.uuid4().int % 10**6)
        stockade("exec", name, "--", "sh", "-c",
                 f"setsid sleep {marker} >/dev/null 2>&1 </dev/null &")  # fmt: skip
        time.sleep(0.3)
        assert pids_with_marker(f"sleep\x00{marker}")

        audit = stockade("audit", name, "--verify")
        assert "chain intact" in audit.stdout
        events = [
            json.loads(line) for line in stockade("audit", name, "--json").stdout.splitlines()
        ]
        actions = [e["action"] for e in events]
        assert "sandbox.created" in actions and "process.started" in actions

        stockade("rm", "--force", name)
        assert pids_with_marker(f"sleep\x00{marker}") == []  # background process gone
        assert name not in stockade("ls").stdout
    finally:
        stockade("rm", "--force", name, check=False)


def test_kill_9_of_supervisor_leaves_nothing(namespace_backend: str, project: Path) -> None:
    name = f"k-{uuid.uuid4().hex[:8]}"
    info = json.loads(stockade("create", "--name", name, "--json", "-C", str(project)).stdout)
    assert info["ok"]
    try:
        marker = str(10**6 + uuid.uuid4().int % 10**6)
        stockade("exec", name, "--", "sh", "-c",
                 f"setsid sleep {marker} >/dev/null 2>&1 </dev/null &")  # fmt: skip
        time.sleep(0.3)
        assert pids_with_marker(f"sleep\x00{marker}")
        from stockade.state import StateStore

        pid = StateStore().get(name).supervisor_pid
        assert pid
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pids_with_marker(f"sleep\x00{marker}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pids_with_marker(f"sleep\x00{marker}") == []
        assert status_of(name) == "failed"  # reported, not hanging (the helper's timeout)
        r = stockade("exec", name, "--", "true", check=False)
        assert r.returncode == 125 and "failed" in r.stderr
    finally:
        stockade("rm", "--force", name, check=False)
    assert name not in stockade("ls").stdout


def test_doctor_lists_every_backend() -> None:
    data = json.loads(stockade("doctor", "--json").stdout)
    names = [b["backend"] for b in data["backends"]]
    assert names == ["microvm", "gvisor", "container", "namespace", "host"]
    for row in data["backends"]:
        if not row["available"]:
            assert row["reason"]
    host = next(b for b in data["backends"] if b["backend"] == "host")
    assert host["auto"] is False
    assert data["auto"] != "host"
    text = stockade("doctor").stdout
    assert "namespace" in text and "microvm" in text


def test_config_errors_name_the_key(project: Path) -> None:
    (project / "stockade.toml").write_text("[limts]\nmemory = '1G'\n")
    r = stockade("run", "--rm", "--", "true", cwd=project, check=False)
    assert r.returncode == 125
    assert "limts" in r.stderr and "limits" in r.stderr


def test_shell_gets_a_terminal(namespace_backend: str, project: Path) -> None:
    name = f"s-{uuid.uuid4().hex[:8]}"
    stockade("create", "--name", name, "-C", str(project))
    try:
        keys = b"tty; echo marker-$((40+2)); exit 4\n"
        text, status = on_a_terminal("shell", name, keys=keys, timeout=30)
        assert "marker-42" in text
        assert "/dev/pts/" in text
        assert os.WEXITSTATUS(status) == 4
    finally:
        stockade("rm", "--force", name, check=False)


def test_sigterm_to_supervisor_stops_the_sandbox_in_order(
    namespace_backend: str, project: Path
) -> None:
    name = f"t-{uuid.uuid4().hex[:8]}"
    stockade("create", "--name", name, "-C", str(project))
    try:
        from stockade.state import StateStore

        pid = StateStore().get(name).supervisor_pid
        assert pid
        marker = str(10**6 + uuid.uuid4().int % 10**6)
        stockade("exec", name, "--", "sh", "-c",
                 f"setsid sleep {marker} >/dev/null 2>&1 </dev/null &")  # fmt: skip
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while status_of(name) == "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status_of(name) == "stopped"  # an orderly stop, not a crash
        assert pids_with_marker(f"sleep\x00{marker}") == []
    finally:
        stockade("rm", "--force", name, check=False)


def _numbered(tag: str, edits: dict[int, str]) -> str:
    return "".join(f"{edits.get(i, f'{tag} {i}')}\n" for i in range(1, 21))


def test_apply_merges_and_reports_conflicts_in_cli_wording(
    namespace_backend: str, project: Path
) -> None:
    (project / "notes.txt").write_text(_numbered("notes", {}))
    (project / "other.txt").write_text(_numbered("other", {}))
    name = f"a-{uuid.uuid4().hex[:8]}"
    agent = (
        "import os\n"
        "def edit(p, n, t):\n"
        "    lines = open(p).read().splitlines(keepends=True)\n"
        "    lines[n - 1] = t + '\\n'\n"
        "    open(p, 'w').write(''.join(lines))\n"
        "edit('notes.txt', 2, 'sandbox 2')\n"
        "edit('other.txt', 5, 'sandbox 5')\n"
        "open('stockade.toml', 'w').write('backend = \"host\"\\n')\n"
        "open('ok.txt\\rHIDDEN', 'w').write('x\\n')\n"
    )
    stockade("run", "--name", name, "--", "python3", "-c", agent, cwd=project)
    try:
        (project / "notes.txt").write_text(_numbered("notes", {18: "host 18"}))
        host_other = _numbered("other", {5: "host 5"})
        (project / "other.txt").write_text(host_other)

        r = stockade("apply", name, "--verbose", cwd=project, check=False)
        assert r.returncode == 1  # a conflict remains
        assert r.stdout.splitlines()[-1] == (
            f"sandbox {name}: 1 applied, 1 merged, 1 conflict: other.txt (changed on the host "
            "and in the sandbox)"
        )
        assert 'applied    "ok.txt\\rHIDDEN"' in r.stdout  # escaped and quoted
        assert "rerun with --conflicts markers to write conflict markers, or --force" in r.stderr
        assert "force=True" not in r.stdout + r.stderr  # CLI wording, not the SDK's
        assert "held back" in r.stderr and "stockade.toml" in r.stderr
        assert "\r" not in r.stdout + r.stderr
        assert (project / "ok.txt\rHIDDEN").read_text() == "x\n"
        assert (project / "other.txt").read_text() == host_other
        assert not (project / "stockade.toml").exists()
        merged = (project / "notes.txt").read_text()
        assert merged == _numbered("notes", {2: "sandbox 2", 18: "host 18"})

        as_json = json.loads(stockade("apply", name, "--json", cwd=project, check=False).stdout)
        assert [c["path"] for c in as_json["conflicts"]] == ["other.txt"]
        assert [h["path"] for h in as_json["held"]] == ["stockade.toml"]

        r = stockade("apply", name, "--conflicts", "markers", cwd=project, check=False)
        assert r.returncode == 1
        assert "resolve the conflict markers in: other.txt" in r.stderr
        assert (
            "<<<<<<< host\nhost 5\n=======\nsandbox 5\n>>>>>>> sandbox\n"
            in (project / "other.txt").read_text()
        )

        r = stockade("apply", name, "stockade.toml", cwd=project)
        assert "warning: applied stockade.toml" in r.stderr
        assert (project / "stockade.toml").read_text() == 'backend = "host"\n'

        events = [json.loads(x) for x in stockade("audit", name, "--json").stdout.splitlines()]
        applied = [e for e in events if e["action"] == "workspace.applied"]
        assert applied and applied[0]["details"]["merged"] == ["notes.txt"]
        assert "chain intact" in stockade("audit", name, "--verify").stdout
    finally:
        stockade("rm", "--force", name, check=False)


def test_diff_of_a_git_repository(namespace_backend: str, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / ".gitignore").write_text(".venv/\n")
    (repo / "a.txt").write_text("a\n")
    (repo / "src").mkdir()
    (repo / "src" / "m.py").write_text("m = 1\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "init")
    name = f"g-{uuid.uuid4().hex[:8]}"
    script = (
        "echo b > a.txt && echo n = 2 > src/n.py && mkdir -p .venv empty && echo j > .venv/j"
        " && git -c user.name=a -c user.email=a@b commit -qam 'agent: edit a'"
    )
    stockade("run", "--name", name, "--", "sh", "-c", script, cwd=repo)
    try:
        r = stockade("diff", name, cwd=repo)
        assert r.stdout.startswith("diff --git a/a.txt b/a.txt\n")
        assert ".venv" not in r.stdout and ".git/" not in r.stdout
        assert "1 path(s) ignored by .gitignore left out (.venv)" in r.stderr
        assert "new empty directories (not in the patch): empty/" in r.stderr
        assert f"to become branch stockade/{name}" in r.stderr and "agent: edit a" in r.stderr
        patch = tmp_path / "p.patch"
        patch.write_text(r.stdout)
        git(repo, "apply", "--check", str(patch))
        only_src = stockade("diff", name, "src", cwd=repo).stdout
        assert "b/src/n.py" in only_src and "a.txt" not in only_src
        assert stockade("diff", name, "n.py", cwd=repo / "src").stdout == only_src
        stat = stockade("diff", name, "--stat", "--include-ignored", cwd=repo).stdout
        assert "A .venv/j" in stat.splitlines()
        data = json.loads(stockade("diff", name, "--json", cwd=repo).stdout)
        assert data["branch"] == f"stockade/{name}"
        assert [c["subject"] for c in data["commits"]] == ["agent: edit a"]
        assert data["patch"] == r.stdout
    finally:
        stockade("rm", "--force", name, check=False)
