"""One conformance suite, run against every isolation backend the registry has built.

The list comes from ``stockade.backends.registry`` (each built backend that ``auto`` may
pick, and each variant of it, such as ``container/docker``), so a new backend is tested as
soon as it is registered. Every test runs the real backend; a backend that cannot run here
skips with its probe's reason, or fails when CI requires it. The same assertions hold on
every backend: behaviour through stockade's API must not depend on the isolation mechanism.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import require_backend
from sandbox_helpers import FORK_BOMB, HelloHandler, host_pids, serve_http, write_trusted_config
from stockade import ExecTimeoutError, Sandbox
from stockade.audit import AuditLog

pytestmark = pytest.mark.timeout(180)


def conformance_backends() -> list[str]:
    from stockade.backends.registry import BACKENDS, variants

    names: list[str] = []
    for entry in BACKENDS:
        if not entry.auto:
            continue
        found = variants(entry.name)
        names += [f"{entry.name}/{v}" for v in found] if found else [entry.name]
    return names


BACKEND_NAMES = conformance_backends()


def create_kwargs(target: str) -> dict[str, Any]:
    """Sandbox.create arguments that select ``target`` (``backend`` or ``backend/variant``)."""
    backend, _, variant = target.partition("/")
    config: dict[str, Any] = {}
    if backend == "container" and variant:
        config["container.engine"] = variant
    return {"backend": backend, "config": config}


def make_project(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text("hello\n")
    (root / "src").mkdir(exist_ok=True)
    (root / "src" / "app.py").write_text("print('app')\n")
    (root / ".git" / "hooks").mkdir(parents=True, exist_ok=True)
    (root / ".git" / "config").write_text("[core]\n")
    return root


@pytest.fixture(scope="module", params=BACKEND_NAMES)
def target(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    require_backend(name)
    return name


@pytest.fixture(scope="module")
def shared(target: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """One sandbox per backend for the tests that leave nothing behind that matters."""
    base = tmp_path_factory.mktemp(f"conformance-{target.replace('/', '-')}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(base / "config"))
        project = make_project(base / "project")
        sandbox = Sandbox.create(
            project_dir=project, state_dir=base / "state", pids=256, **create_kwargs(target)
        )
    try:
        yield sandbox
    finally:
        sandbox.close()


def fresh(target: str, project: Path, **kwargs: Any) -> Sandbox:
    args = create_kwargs(target)
    args["config"] = {**args["config"], **kwargs.pop("config", {})}
    return Sandbox.create(project_dir=project, **args, **kwargs)


def inside_pids(sb: Sandbox, marker: str) -> list[str]:
    """Pids inside the sandbox whose command line contains ``marker`` (works on every kernel)."""
    script = (
        "import os,sys\n"
        "m=sys.argv[1].encode()\n"
        "for p in os.listdir('/proc'):\n"
        "    if p.isdigit() and int(p) != os.getpid():\n"
        "        try: c=open(f'/proc/{p}/cmdline','rb').read()\n"
        "        except OSError: continue\n"
        "        if m in c.replace(b'\\0', b' '): print(p)\n"
    )
    return sb.commands.run(["python3", "-c", script, marker]).stdout.split()


# --- exec, stdin, signals, timeouts, PTY, files -------------------------------------------


def test_exec(shared: Sandbox) -> None:
    r = shared.commands.run("echo out; echo err >&2; exit 3")
    assert (r.exit_code, r.stdout, r.stderr) == (3, "out\n", "err\n")
    assert shared.commands.run(["cat", "/etc/hostname"]).stdout.strip() == "sandbox"
    assert shared.commands.run("pwd").stdout.strip() == "/workspace"
    assert shared.commands.run(["python3", "-c", "print(6 * 7)"]).stdout == "42\n"
    env = shared.commands.run("echo $HOME:$MY_VAR", env={"MY_VAR": "x"}).stdout
    assert env == "/tmp/home:x\n"


def test_stdin(shared: Sandbox) -> None:
    assert shared.commands.run(["sh", "-c", "cat"], stdin=b"piped").stdout == "piped"
    handle = shared.commands.run("read line; echo got $line", background=True, stdin=b"")
    handle.send_stdin("value\n")
    assert handle.wait().stdout == "got value\n"


def test_signals(shared: Sandbox) -> None:
    sleeper = shared.commands.run(["sleep", "60"], background=True)
    sleeper.signal(signal.SIGTERM)
    result = sleeper.wait()
    assert result.signal == signal.SIGTERM or result.exit_code == 143


def test_command_timeout_kills_the_whole_group(shared: Sandbox) -> None:
    marker = f"9{uuid.uuid4().int % 10**6:06d}"
    with pytest.raises(ExecTimeoutError) as info:
        shared.commands.run(f"sleep {marker} & sleep {marker}", timeout=0.5)
    assert info.value.result is not None and info.value.result.timed_out
    deadline = time.monotonic() + 5
    while inside_pids(shared, f"sleep {marker}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert inside_pids(shared, f"sleep {marker}") == []


def test_pty(shared: Sandbox) -> None:
    chunks: list[bytes] = []
    handle = shared.pty.create(["/bin/sh", "-i"], rows=30, cols=100, on_data=chunks.append)
    handle.send_stdin(b"stty size; tty; exit 5\n")
    result = handle.wait()
    output = b"".join(chunks).decode(errors="replace")
    assert result.exit_code == 5
    assert "30 100" in output
    assert "/dev/pts/" in output


def test_files(shared: Sandbox) -> None:
    from stockade import SandboxFileNotFoundError, SandboxPermissionError

    shared.files.write("dir/note.txt", "hello files")
    assert shared.files.read("dir/note.txt") == "hello files"
    assert shared.commands.run("cat dir/note.txt").stdout == "hello files"
    big = os.urandom(3 * 1024 * 1024)
    shared.files.write("/tmp/big.bin", big)
    assert shared.files.read("/tmp/big.bin", format="bytes") == big
    assert [e.name for e in shared.files.list("dir")] == ["note.txt"]
    shared.files.remove("dir", recursive=True)
    assert not shared.files.exists("dir/note.txt")
    with pytest.raises(SandboxFileNotFoundError):
        shared.files.read("missing.txt")
    with pytest.raises(SandboxPermissionError):
        shared.files.write("/usr/evil.txt", "x")


@pytest.mark.parametrize("path", ["/usr/evil", "/etc/evil", "/evil", "/run/stockade/evil"])
def test_writes_outside_workspace_and_tmp_fail(shared: Sandbox, path: str) -> None:
    assert shared.commands.run(["sh", "-c", f"echo x > {path}"]).exit_code != 0
    assert not Path(path).exists()
    assert shared.commands.run("echo x > /tmp/ok && echo y > ok.txt && rm ok.txt").exit_code == 0


def test_no_privileges(shared: Sandbox) -> None:
    status = shared.commands.run("grep -E '^CapEff' /proc/self/status").stdout
    assert "CapEff:\t0000000000000000" in status
    assert shared.agent_info is not None
    if shared.agent_info.kernel == os.uname().release:
        # Where the host kernel serves the sandbox, new namespaces are its attack surface.
        # (A user-space or guest kernel implements them itself, harmlessly.)
        assert shared.commands.run("unshare -U true").exit_code != 0
    assert shared.commands.run("cat /etc/shadow").exit_code != 0
    assert shared.commands.run("ls /root").exit_code != 0


# --- workspace ------------------------------------------------------------------------


def test_diff_apply_reset(target: str, tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    with fresh(target, project) as sb:
        r = sb.commands.run("echo hi > new.txt && echo changed > README.md && rm src/app.py")
        assert r.exit_code == 0, r.stderr
        assert not (project / "new.txt").exists()
        assert (project / "README.md").read_text() == "hello\n"
        kinds = {c.path: c.kind for c in sb.workspace.diff()}
        assert kinds == {"new.txt": "added", "README.md": "modified", "src/app.py": "deleted"}
        sb.workspace.apply(["new.txt", "README.md"])
        assert (project / "new.txt").read_text() == "hi\n"
        assert (project / "README.md").read_text() == "changed\n"
        assert (project / "src" / "app.py").exists()
        assert sb.commands.run("echo evil > .git/hooks/pre-commit").exit_code != 0
        assert sb.commands.run("echo x >> .git/config").exit_code != 0
        sb.workspace.reset()
        assert not sb.workspace.diff()
        assert sb.commands.run("cat src/app.py").stdout == "print('app')\n"
    assert not (project / ".git" / "hooks" / "pre-commit").exists()
    assert (project / ".git" / "config").read_text() == "[core]\n"


_CONNECT = """
import socket
s = socket.socket(socket.AF_UNIX)
try:
    s.connect("svc.sock")
except FileNotFoundError:
    print("missing")
except OSError as exc:
    print("refused", exc.errno)
else:
    print("connected")
"""


def test_host_socket_in_a_cow_workspace_answers_nothing(target: str, tmp_path: Path) -> None:
    # Why policy/mounts.py does not refuse a cow workspace holding a socket (ro/rw binds it).
    import socket

    project = make_project(tmp_path / "project")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(project / "svc.sock"))
    server.listen(1)
    server.setblocking(False)
    try:
        with fresh(target, project) as sb:
            r = sb.commands.run(["python3", "-c", _CONNECT])
            assert r.exit_code == 0, r.stderr
            assert r.stdout.split()[0] in ("missing", "refused"), r.stdout
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever reached the host's service
    finally:
        server.close()


def _host_git(repo: Path, *args: str) -> str:
    from sandbox_helpers import git

    return git(repo, *args, user="host")


def _git_state(repo: Path) -> dict[str, bytes]:
    """HEAD, index, packed-refs, every loose ref and reflog of a repository."""
    git_dir = repo / ".git"
    out = {n: (git_dir / n).read_bytes() for n in ("HEAD", "index", "packed-refs")
           if (git_dir / n).exists()}  # fmt: skip
    for sub in ("refs", "logs"):
        for dirpath, _dirs, files in os.walk(git_dir / sub):
            for name in files:
                path = Path(dirpath) / name
                out[path.relative_to(git_dir).as_posix()] = path.read_bytes()
    return out


_AGENT_WORK = """
set -e
echo 'agent line' >> README.md
mkdir -p pkg/sub
echo 'x = 1' > pkg/sub/m.py
echo 'y = 2' > pkg/n.py
rm src/old.py
mkdir -p .venv/lib src/__pycache__ .pytest_cache
echo junk > .venv/lib/site.py
printf 'junk' > src/__pycache__/app.cpython-311.pyc
echo cache > .pytest_cache/v
git add -A
git -c user.name=agent -c user.email=agent@x commit -q -m 'agent: add pkg'
git rev-parse HEAD
"""


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed on the host")
def test_git_repository_review(target: str, tmp_path: Path) -> None:
    """A real repository: the agent edits, creates a dir, deletes, makes ignored junk and
    commits while the host commits too. The diff holds only what matters and applies with
    git; the agent's commit becomes stockade/NAME; the host's refs and reflogs stay."""
    from stockade.workspace.gitrepo import import_commits

    project = tmp_path / "project"
    project.mkdir()
    _host_git(project, "init", "-q", "-b", "main")
    (project / ".gitignore").write_text(".venv/\n__pycache__/\n.pytest_cache/\n")
    (project / "README.md").write_text("hello\n")
    (project / "src").mkdir()
    (project / "src" / "app.py").write_text("print('app')\n")
    (project / "src" / "old.py").write_text("old = True\n")
    _host_git(project, "add", "-A")
    _host_git(project, "commit", "-q", "-m", "init")
    with fresh(target, project) as sb:
        if sb.commands.run("command -v git").exit_code != 0:
            pytest.skip(f"the {target} sandbox has no git program (its image lacks git)")
        r = sb.commands.run(_AGENT_WORK)
        assert r.exit_code == 0, r.stderr
        agent_sha = r.stdout.strip().splitlines()[-1]
        (project / "host.txt").write_text("the host's own work\n")
        _host_git(project, "add", "host.txt")
        _host_git(project, "commit", "-q", "-m", "host: meanwhile")
        host_sha = _host_git(project, "rev-parse", "HEAD").strip()
        before = _git_state(project)

        diff = sb.workspace.diff()
        files = {c.path: c.kind for c in diff if c.type != "dir"}
        assert files == {
            "README.md": "modified",
            "pkg/n.py": "added",
            "pkg/sub/m.py": "added",
            "src/old.py": "deleted",
        }
        assert {".venv", ".pytest_cache", "src/__pycache__"} <= set(diff.ignored_paths)
        assert not any(".git" in c.path.split("/") for c in diff)
        assert [(c.sha, c.subject) for c in diff.commits] == [(agent_sha, "agent: add pkg")]
        patch = tmp_path / "agent.patch"
        patch.write_bytes(diff.patch_bytes())
        _host_git(project, "apply", "--check", str(patch))

        layers = sb._inner._layers
        assert layers is not None
        assert import_commits(layers, project, f"stockade/{sb.name}") == [agent_sha]
    after = _git_state(project)
    assert after.pop(f"refs/heads/stockade/{sb.name}").decode().strip() == agent_sha
    assert after == before  # HEAD, index, main, reflogs untouched; no new reflog
    assert _host_git(project, "rev-parse", "main").strip() == host_sha
    assert _host_git(project, "show", f"stockade/{sb.name}:pkg/sub/m.py") == "x = 1\n"
    _host_git(project, "fsck", "--strict")


def _lines(tag: str, edits: dict[int, str]) -> str:
    return "".join(f"{edits.get(i, f'{tag} line {i}')}\n" for i in range(1, 21))


def test_apply_merges_and_reports_conflicts_in_a_git_repo(target: str, tmp_path: Path) -> None:
    project = tmp_path / "repo"
    project.mkdir()
    _host_git(project, "init", "-q", "-b", "main")
    (project / "notes.txt").write_text(_lines("notes", {}))
    (project / "other.txt").write_text(_lines("other", {}))
    _host_git(project, "add", "-A")
    _host_git(project, "commit", "-qm", "start")
    with fresh(target, project) as sb:
        script = (
            "import sys\n"
            "def edit(name, line, text):\n"
            "    lines = open(name).read().splitlines(keepends=True)\n"
            "    lines[line - 1] = text + '\\n'\n"
            "    open(name, 'w').write(''.join(lines))\n"
            "edit('notes.txt', 2, 'sandbox 2')\n"
            "edit('other.txt', 5, 'sandbox 5')\n"
            "open(b'bad\\xff.txt', 'wb').write(b'odd name')\n"
        )
        r = sb.commands.run(["python3", "-c", script])
        assert r.exit_code == 0, r.stderr
        # Meanwhile the user edits and commits on the host.
        (project / "notes.txt").write_text(_lines("notes", {18: "host 18"}))
        host_other = _lines("other", {5: "host 5"})
        (project / "other.txt").write_text(host_other)
        _host_git(project, "commit", "-qam", "host edits")
        refs = _host_git(project, "for-each-ref", "--format=%(refname) %(objectname)")
        reflog = _host_git(project, "reflog", "--format=%H %gs")
        head = _host_git(project, "rev-parse", "HEAD")

        result = sb.workspace.apply()

        assert result.merged == ["notes.txt"]
        assert [(c.path, c.reason, c.written) for c in result.conflicts] == [
            ("other.txt", "changed on the host and in the sandbox", False)
        ]
        assert (project / "notes.txt").read_text() == _lines(
            "notes", {2: "sandbox 2", 18: "host 18"}
        )
        assert (project / "other.txt").read_text() == host_other
        # A name that is not UTF-8 goes through apply and into the audit log.
        assert result.applied == [os.fsdecode(b"bad\xff.txt")]
        assert (project / os.fsdecode(b"bad\xff.txt")).read_bytes() == b"odd name"
        audit = AuditLog(sb.audit_path, sb.name)
        events = [e for e in audit.read() if e.action == "workspace.applied"]
        assert [e.details["applied"] for e in events] == [["bad\\xff.txt"]]
        assert events[0].details["merged"] == ["notes.txt"]
        assert audit.verify().ok
    # The host's history is untouched: same refs (a stockade/ branch may be added), reflog,
    # HEAD; only the working tree changed; the object store is sound.
    after = _host_git(project, "for-each-ref", "--format=%(refname) %(objectname)").splitlines()
    assert [r for r in after if not r.startswith("refs/heads/stockade/")] == refs.splitlines()
    assert _host_git(project, "reflog", "--format=%H %gs") == reflog
    assert _host_git(project, "rev-parse", "HEAD") == head
    status = _host_git(project, "status", "--porcelain")
    assert status == ' M notes.txt\n?? "bad\\377.txt"\n'  # git quotes the odd name
    _host_git(project, "fsck", "--strict", "--no-dangling")  # asserts a clean fsck


def test_agent_commit_becomes_a_branch_on_apply(target: str, tmp_path: Path) -> None:
    project = tmp_path / "repo"
    project.mkdir()
    _host_git(project, "init", "-q", "-b", "main")
    (project / "a.txt").write_text("a\n")
    _host_git(project, "add", "-A")
    _host_git(project, "commit", "-qm", "start")
    with fresh(target, project) as sb:
        if sb.commands.run("command -v git").exit_code != 0:
            pytest.skip(f"no git inside the {target} sandbox to commit with")
        r = sb.commands.run(
            "echo b > b.txt && git add b.txt && "
            "git -c user.name=agent -c user.email=agent@x commit -qm 'agent work'"
        )
        assert r.exit_code == 0, r.stderr
        (project / "host.txt").write_text("host\n")
        _host_git(project, "add", "host.txt")
        _host_git(project, "commit", "-qm", "host work")
        reflog = _host_git(project, "reflog", "--format=%H %gs")
        head = _host_git(project, "rev-parse", "HEAD")
        result = sb.workspace.apply()
        name = sb.name
    assert result.branch == f"stockade/{name}"
    assert len(result.commits) == 1
    assert _host_git(project, "log", "--format=%s", f"stockade/{name}") == "agent work\nstart\n"
    assert _host_git(project, "rev-parse", "HEAD") == head  # the host's branch is where it was
    assert _host_git(project, "reflog", "--format=%H %gs") == reflog
    assert _host_git(project, "log", "--format=%s", "main") == "host work\nstart\n"
    _host_git(project, "fsck", "--strict")  # asserts a clean fsck


# --- limits -----------------------------------------------------------------------------


def test_limits_fork_bomb_and_memory_hog(target: str, tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    hog = "b = bytearray(768 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); print('survived')"
    with fresh(target, project, pids=64, memory="192M") as sb:
        r = sb.commands.run(["python3", "-c", FORK_BOMB], timeout=90)
        assert r.exit_code == 0, r.stderr
        assert int(r.stdout.split()[0]) < 64
        r = sb.commands.run(["python3", "-c", hog], timeout=90)
        assert "survived" not in r.stdout
        assert r.exit_code != 0
        assert sb.commands.run("echo ok").stdout == "ok\n"  # the sandbox itself survives


DISK_LIMIT = 64 * 2**20
#: Writes 100 MiB to argv[1], 1 MiB at a time; on an error prints it and exits with its errno.
FILL = (
    "import os, sys\n"
    "try:\n"
    "    with open(sys.argv[1], 'wb') as f:\n"
    "        for _ in range(100):\n"
    "            f.write(b'x' * 2**20)\n"
    "            f.flush()\n"
    "        os.fsync(f.fileno())\n"
    "except OSError as e:\n"
    "    print(e.strerror)\n"
    "    sys.exit(e.errno)\n"
    "print('wrote 100 MiB')\n"
)


def _footprint(path: Path) -> int:
    """Bytes of the host's disk that ``path`` holds (allocated blocks; a sandbox's own disk
    counts as its image file, its mount point is not crossed)."""
    total = 0
    device = os.lstat(path).st_dev
    for top, dirs, files in os.walk(path):
        for name in list(dirs):
            st = os.lstat(os.path.join(top, name))
            total += st.st_blocks * 512
            if st.st_dev != device:
                dirs.remove(name)
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(top, name)).st_blocks * 512
    return total


def _require_disk_limit(target: str) -> None:
    from stockade.workspace.disk import disk_support

    enforced, why = disk_support()
    if not enforced and not target.startswith("microvm"):  # a VM bounds it inside itself
        pytest.skip(why)


def test_disk_limit_bounds_workspace_and_tmp(target: str, tmp_path: Path) -> None:
    import errno

    _require_disk_limit(target)
    project = make_project(tmp_path / "project")
    with fresh(target, project, config={"limits.disk": "64MiB"}) as sb:
        assert sb.commands.run("echo small > small.txt && mkdir d && echo y > d/y").exit_code == 0
        before = _footprint(sb.state_dir)
        r = sb.commands.run(["python3", "-c", FILL, "/tmp/big"], timeout=120)
        assert (r.exit_code, r.stdout) == (errno.ENOSPC, "No space left on device\n"), r
        assert sb.commands.run("rm /tmp/big").exit_code == 0
        r = sb.commands.run("dd if=/dev/zero of=big.bin bs=1M count=100 2>&1; echo rc=$?")
        assert "No space left on device" in r.stdout and "rc=0" not in r.stdout, r.stdout
        # One bound for everything: with the workspace full, home (in /tmp) is full too.
        r = sb.commands.run(["python3", "-c", FILL, "/tmp/home/.cache-file"], timeout=120)
        assert (r.exit_code, r.stdout) == (errno.ENOSPC, "No space left on device\n"), r
        paths = {c.path for c in sb.workspace.diff()}
        assert {"small.txt", "d/y", "big.bin"} <= paths
        assert (project / "README.md").read_text() == "hello\n"
        # The host keeps at most the limit for it (plus logs and records), wherever it wrote.
        assert _footprint(sb.state_dir) - before <= DISK_LIMIT + 2 * 2**20
        state_dir = sb.state_dir
    assert _disk_leftovers(state_dir) == []


def _disk_leftovers(state_dir: Path) -> list[str]:
    """Mounts and loop devices of ``state_dir`` still on the host."""
    import subprocess

    found = []
    for argv in (["findmnt", "-rn", "-o", "TARGET,SOURCE"], ["losetup", "-a"]):
        out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
        found += [line for line in out.splitlines() if str(state_dir) in line]
    return found


def test_rm_releases_the_disk(target: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    _require_disk_limit(target)
    project = make_project(tmp_path / "project")
    name = f"disk-{uuid.uuid4().hex[:8]}"
    sb = fresh(target, project, config={"limits.disk": "64MiB"}, name=name, keep=True)
    state_dir = sb.state_dir

    def cli(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "stockade.cli.main", *args],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    try:
        assert sb.commands.run("echo kept > kept.txt").exit_code == 0
        sb.close()
        assert "kept.txt" in cli("diff", name)  # stopped: the disk is read again
        cli("rm", "--force", name)
        assert not state_dir.exists()
        assert _disk_leftovers(state_dir) == []
    finally:
        if state_dir.exists():  # failed half-way: no mount left for pytest to trip over
            from stockade.workspace.disk import remove_state_dir

            sb.close()
            remove_state_dir(state_dir)


# --- secrets and network -------------------------------------------------------------------


@pytest.fixture
def host_server() -> Iterator[int]:
    with serve_http(HelloHandler) as port:
        yield port


def test_secrets_are_invisible(
    target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = make_project(tmp_path / "project")
    secret = f"real-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("CONFORMANCE_TOKEN", secret)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", f"aws-{secret}")
    write_trusted_config(
        project, '[secrets.API_TOKEN]\nenv = "CONFORMANCE_TOKEN"\nhosts = ["127.0.0.1"]\n'
    )
    with fresh(target, project) as sb:
        token = sb.commands.run("printf %s $API_TOKEN").stdout
        assert token.startswith("stockade-secret-API_TOKEN-") and secret not in token
        # Searched for without ever writing the value inside: two halves joined in the command.
        half = len(secret) // 2
        halves = {"A": secret[:half], "B": secret[half:]}
        in_env = sb.commands.run(
            'cat /proc/[0-9]*/environ 2>/dev/null | tr "\\0" "\\n" | grep -c "$A$B"; true',
            env=halves,
        )
        assert in_env.stdout.strip() == "0"
        in_files = sb.commands.run(
            'grep -rl "$A$B" / --exclude-dir=proc --exclude-dir=sys --exclude-dir=usr'
            " --exclude-dir=dev 2>/dev/null; true",
            env=halves,
        )
        assert in_files.stdout == ""
        assert "AWS_SECRET" not in sb.commands.run("env").stdout
    assert secret not in sb.audit_path.read_text()


def test_network_only_through_the_proxy(target: str, tmp_path: Path, host_server: int) -> None:
    project = make_project(tmp_path / "project")
    write_trusted_config(project, '[network]\nallow = ["127.0.0.1"]\n')
    direct = (
        "import socket, sys\n"
        "for addr in (('127.0.0.1', int(sys.argv[1])), ('203.0.113.7', 80)):\n"
        "    try:\n"
        "        s = socket.create_connection(addr, timeout=3)\n"
        "        data = s.recv(4096); s.close()\n"
        # A backend may answer a direct attempt with the policy's refusal; nothing else.
        "        print('refused-by-policy' if b'network policy denied' in data else 'connected')\n"
        "    except OSError as e:\n"
        "        print(type(e).__name__)\n"
        "try:\n    socket.getaddrinfo('example.com', 80); print('resolved')\n"
        "except OSError as e:\n    print(type(e).__name__)\n"
    )
    via_proxy = (
        "import sys, urllib.request\n"
        "proxy = urllib.request.ProxyHandler({'http': 'http://127.0.0.1:3128'})\n"
        "opener = urllib.request.build_opener(proxy)\n"
        "print(opener.open(f'http://127.0.0.1:{sys.argv[1]}/', timeout=10).read().decode())\n"
    )
    with fresh(target, project) as sb:
        r = sb.commands.run(["python3", "-c", direct, str(host_server)])
        assert r.exit_code == 0, r.stderr
        lines = r.stdout.split()
        assert lines[0] != "connected" and lines[1] != "connected" and lines[2] != "resolved"
        # urllib honours NO_PROXY (which lists 127.0.0.1) even with an explicit proxy.
        no_bypass = {"no_proxy": "", "NO_PROXY": ""}
        r = sb.commands.run(["python3", "-c", via_proxy, str(host_server)], env=no_bypass)
        assert r.stdout.strip() == "hello from the host", r.stderr
        # The proxy logs a connection when it closes, which may be just after the response.
        deadline = time.monotonic() + 10

        def proxied() -> list[str]:
            return [c["decision"] for c in sb.network.log() if c["kind"] != "direct"]

        while not proxied() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proxied() == ["allowed"]
        # Backends that report direct attempts log them as denied, never allowed.
        assert all(c["decision"] == "denied" for c in sb.network.log() if c["kind"] == "direct")


# --- cleanup ------------------------------------------------------------------------------


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return "(gone)"


def _settled_leftovers(target: str, sandbox_id: str, state_dir: Path) -> list[str]:
    """``_leftovers``, given a process that is already exiting (an engine's conmon after its
    container was removed, on a loaded machine) a few seconds to be gone."""
    deadline = time.monotonic() + 10
    while True:
        found = _leftovers(target, sandbox_id, state_dir)
        only_processes = all(item.startswith("processes ") for item in found)
        if not found or not only_processes or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _leftovers(target: str, sandbox_id: str, state_dir: Path) -> list[str]:
    """Everything of one sandbox still present on the host, by kind."""
    from stockade.backends._cgroups import SandboxCgroup

    found = []
    pids = host_pids(sandbox_id)
    if pids:
        found.append(f"processes {[(pid, _cmdline(pid)) for pid in pids]}")
    for mountinfo in Path("/proc").glob("[0-9]*/mountinfo"):
        try:
            text = mountinfo.read_text()
        except OSError:
            continue
        if sandbox_id in text or str(state_dir) in text:
            found.append(f"mount in {mountinfo}")
            break
    if SandboxCgroup.find(sandbox_id) is not None:
        found.append("cgroup")
    backend, _, variant = target.partition("/")
    if backend == "gvisor" or variant in ("runc", "crun"):
        from stockade.backends.oci_runtime import runtime_state_root

        runtime = "runsc" if backend == "gvisor" else variant
        root = runtime_state_root(runtime)
        if any(sandbox_id in p.name for p in root.iterdir()):
            found.append(f"{runtime} state in {root}")
    if variant in ("docker", "podman"):
        from stockade.backends.container.engine import LABEL, client_for

        client = client_for(variant)
        try:
            selector = {"label": f"{LABEL}={sandbox_id}"}
            if client.api.containers(all=True, filters=selector):
                found.append(f"{variant} container")
            if client.api.volumes(filters=selector).get("Volumes"):
                found.append(f"{variant} volume")
        finally:
            client.close()
    return found


def test_close_leaves_nothing(target: str, tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    marker = f"{uuid.uuid4().int % 10**6 + 10**6}"
    sb = fresh(target, project)
    sandbox_id, state_dir = sb.id, sb.state_dir
    sb.commands.run(f"setsid sleep {marker} >/dev/null 2>&1 < /dev/null &")
    sb.commands.run("echo x > written.txt")
    assert inside_pids(sb, f"sleep {marker}")
    sb.close()
    assert host_pids(f"sleep\x00{marker}") == []
    assert _settled_leftovers(target, sandbox_id, state_dir) == []
    assert not state_dir.exists()


_FAILED_STARTS = {
    # Found missing while the sandbox starts, after its record and directory were made.
    "missing secret": (
        '[secrets.API_TOKEN]\nenv = "CONFORMANCE_UNSET_SECRET"\nhosts = ["127.0.0.1"]\n',
        "CONFORMANCE_UNSET_SECRET is not set",
    ),
    # The backend is launched and cannot make the workspace's mount point inside a file.
    "backend start": (
        '[workspace]\nmount = "/etc/passwd/ws"\n',
        "did not start|could not (start|create) the sandbox|refused sandbox.configure",
    ),
}


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("failure", list(_FAILED_STARTS))
def test_a_failed_start_leaves_nothing(
    target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str, keep: bool
) -> None:
    from stockade import StockadeError
    from stockade.state import StateStore, default_state_dir

    project = make_project(tmp_path / "project")
    monkeypatch.delenv("CONFORMANCE_UNSET_SECRET", raising=False)
    config, message = _FAILED_STARTS[failure]
    write_trusted_config(project, config)
    state = default_state_dir()  # short enough for the sockets made in it
    with pytest.raises(StockadeError, match=message):
        fresh(target, project, keep=keep)
    assert os.listdir(state / "sandboxes") == []
    assert StateStore(state).list() == []
    [log] = (state / "audit").iterdir()  # the audit log alone says it was tried
    assert '"sandbox.created"' in log.read_text()
    sandbox_id = log.name.split(".")[-2]  # NAME.ID.jsonl
    assert _settled_leftovers(target, sandbox_id, state / "sandboxes" / sandbox_id) == []


def test_sandbox_wall_clock_timeout(target: str, tmp_path: Path) -> None:
    from stockade import SandboxStateError

    project = make_project(tmp_path / "project")
    with fresh(target, project, timeout=1) as sb:
        with pytest.raises(SandboxStateError, match="timeout"):  # not sleep's exit 0
            sb.commands.run(["sleep", "30"])
        assert not sb.is_running()


def test_reap_after_the_timeout_kill_leaves_nothing(target: str, tmp_path: Path) -> None:
    """The wall-clock timeout ends the unit from its timer thread (``LaunchedSandbox.kill_now``,
    no teardown): what the backend's engine keeps of it is one of ``Backend.orphans`` until
    ``Backend.reap`` removes it, and the teardown after that still leaves nothing."""
    from stockade import SandboxStateError
    from stockade.backends.registry import get_backend_class

    backend = get_backend_class(target.partition("/")[0])
    keeps_engine_state = "orphans" in vars(backend)  # its engines outlive a killed unit
    project = make_project(tmp_path / "project")
    sb = fresh(target, project, timeout=1)
    sandbox_id, state_dir = sb.id, sb.state_dir
    try:
        with pytest.raises(SandboxStateError, match="timeout"):
            sb.commands.run(["sleep", "30"])
        assert not sb.is_running()
        if keeps_engine_state:
            assert sandbox_id in {o.sandbox_id for o in backend.orphans()}
        backend.reap(sandbox_id)
        assert sandbox_id not in {o.sandbox_id for o in backend.orphans()}
    finally:
        sb.close()
    assert _leftovers(target, sandbox_id, state_dir) == []
    assert not state_dir.exists()


# --- nothing is lost when a sandbox ends ------------------------------------------------------
#
# Every way a sandbox ends keeps what its command wrote in the workspace (a microVM saves the
# guest's upper layer first), read back afterwards through `stockade diff`; where a save is
# impossible (the VM was killed), diff and ls say what was lost, never "no changes".

WRITE = "echo kept > made.txt"


def cli_env(target: str) -> dict[str, str]:
    """The environment that selects ``target`` (the state directory is the test's own)."""
    backend, _, variant = target.partition("/")
    env = {**os.environ, "STOCKADE_BACKEND": backend}
    if variant:
        env["STOCKADE_CONTAINER_ENGINE"] = variant
    return env


def cli(
    target: str, *args: str, check: bool = True, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "stockade.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(target),
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"stockade {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
    return proc


def cli_popen(target: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "stockade.cli.main", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=cli_env(target),
    )


def record_of(target: str, name: str) -> dict[str, Any]:
    rows = json.loads(cli(target, "ls", "--json").stdout)
    found: dict[str, Any] = next(r for r in rows if r["name"] == name)
    return found


def assert_kept(target: str, name: str) -> None:
    """The file the command wrote is in the sandbox's diff, and nothing was reported lost."""
    diff = cli(target, "diff", name, "--stat")
    assert "made.txt" in diff.stdout, diff.stderr
    assert "could not be saved" not in diff.stderr
    assert record_of(target, name)["status"] == "stopped"


def discard(target: str, name: str) -> None:
    cli(target, "rm", "--force", name, check=False)  # it has unapplied changes


def unique(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:8]}"


def test_changes_survive_stop(target: str, tmp_path: Path) -> None:
    project, name = make_project(tmp_path / "project"), unique("stop")
    cli(target, "create", "--name", name, "-C", str(project))
    try:
        cli(target, "exec", name, "--", "sh", "-c", WRITE)
        cli(target, "stop", name)
        assert_kept(target, name)
        assert not (project / "made.txt").exists()
    finally:
        discard(target, name)


def test_connect_drives_a_cli_created_sandbox(target: str, tmp_path: Path) -> None:
    """This process is not the supervisor: it reaches the sandbox over the control socket."""
    project, name = make_project(tmp_path / "project"), unique("connect")
    cli(target, "create", "--name", name, "-C", str(project))
    try:
        listed = {info.name: info for info in Sandbox.list()}
        assert listed[name].status == "running" and listed[name].connectable
        assert listed[name].backend == target.partition("/")[0]
        with Sandbox.connect(name) as sb:
            r = sb.commands.run("cat README.md; echo err >&2; exit 5")
            assert (r.stdout, r.stderr, r.exit_code) == ("hello\n", "err\n", 5)
            sb.files.write("made.txt", "kept\n")
            assert sb.files.read("made.txt") == "kept\n"
            assert [c.path for c in sb.workspace.diff()] == ["made.txt"]
            assert sb.workspace.apply().applied == ["made.txt"]
        assert (project / "made.txt").read_text() == "kept\n"
        # Closing detached; the sandbox still runs for the CLI.
        assert cli(target, "exec", name, "--", "cat", "made.txt").stdout == "kept\n"
    finally:
        discard(target, name)


def test_changes_survive_supervisor_shutdown(target: str, tmp_path: Path) -> None:
    from stockade.state import StateStore

    project, name = make_project(tmp_path / "project"), unique("supervisor")
    cli(target, "create", "--name", name, "-C", str(project))
    try:
        cli(target, "exec", name, "--", "sh", "-c", WRITE)
        pid = StateStore().get(name).supervisor_pid
        assert pid is not None
        os.kill(pid, signal.SIGTERM)  # as a system shutdown would
        deadline = time.monotonic() + 200
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert_kept(target, name)
    finally:
        discard(target, name)


def test_changes_survive_run_without_rm(target: str, tmp_path: Path) -> None:
    project, name = make_project(tmp_path / "project"), unique("run")
    try:
        r = cli(target, "run", "--name", name, "-C", str(project), "--", "sh", "-c", WRITE)
        assert "made.txt" in r.stderr  # run's own summary
        assert_kept(target, name)
    finally:
        discard(target, name)


def test_changes_survive_the_sandbox_timeout(target: str, tmp_path: Path) -> None:
    project, name = make_project(tmp_path / "project"), unique("timeout")
    try:
        r = cli(target, "run", "--name", name, "--timeout", "10", "-C", str(project),
                "--", "sh", "-c", f"{WRITE}; sleep 300", check=False)  # fmt: skip
        assert r.returncode != 0 and "timeout" in r.stderr, r.stderr
        diff = cli(target, "diff", name, "--stat")
        assert "made.txt" in diff.stdout, diff.stderr
        assert "could not be saved" not in diff.stderr
    finally:
        discard(target, name)


def test_changes_survive_sigterm_of_the_run_cli(target: str, tmp_path: Path) -> None:
    project, name = make_project(tmp_path / "project"), unique("sigterm")
    proc = cli_popen(target, "run", "--name", name, "-C", str(project),
                     "--", "sh", "-c", f"{WRITE}; echo written; sleep 300")  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "written\n"  # the command runs, the file is written
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=200)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert_kept(target, name)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        discard(target, name)


def test_changes_survive_close_with_keep_and_holes_stay_holes(target: str, tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    with fresh(target, project, keep=True) as sb:
        r = sb.commands.run(f"{WRITE} && truncate -s 1G sparse.img && echo end >> sparse.img")
        assert r.exit_code == 0, r.stderr
        name, upper = sb.name, sb.state_dir / "upper"
    try:
        diff = cli(target, "diff", name, "--stat")
        assert {"made.txt", "sparse.img"} <= set(diff.stdout.split()), diff.stderr
        info = os.stat(upper / "sparse.img")
        assert info.st_size == 1024**3 + 4
        assert info.st_blocks * 512 < 16 * 1024**2  # the hole did not become zeros
    finally:
        discard(target, name)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return ""


def test_a_lost_save_is_reported_never_no_changes(target: str, tmp_path: Path) -> None:
    if not target.startswith("microvm"):
        pytest.skip(f"the {target} backend writes the workspace on the host: nothing to lose")
    project, name = make_project(tmp_path / "project"), unique("lost")
    sandbox_id = json.loads(cli(target, "create", "--name", name, "--json",
                                "-C", str(project)).stdout)["id"]  # fmt: skip
    try:
        cli(target, "exec", name, "--", "sh", "-c", WRITE)
        vmms = ("qemu", "firecracker", "cloud-hyp")
        vmm = [p for p in host_pids(sandbox_id) if _comm(p).startswith(vmms)]
        assert vmm, "the VM's process was not found"
        for pid in vmm:
            os.kill(pid, signal.SIGKILL)  # the VM crashes before its changes were saved
        cli(target, "stop", name)
        diff = cli(target, "diff", name)
        assert f"the workspace changes of {name} could not be saved" in diff.stderr
        assert "no changes" not in diff.stderr
        listing = cli(target, "ls")
        assert "could not be saved" in listing.stdout
        row = record_of(target, name)
        assert row["status"] == "failed" and "could not be saved" in row["error"]
        audit = cli(target, "audit", name, "--json").stdout
        assert "workspace.lost" in audit
    finally:
        discard(target, name)
