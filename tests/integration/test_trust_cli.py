"""Untrusted project files cannot open the sandbox; dangerous shared directories are refused
whoever asks (issue 10). The real CLI in a subprocess and the real SDK on the namespace
backend."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stockade import PolicyError, Sandbox
from stockade.state import StateStore

pytestmark = pytest.mark.timeout(180)

ISSUE_FILE = 'backend = "host"\nunsafe_host = true\n[workspace]\nmode = "rw"\n'


def cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stockade.cli.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )


@pytest.fixture
def isolated_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a user whose config and state live under tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
    env["STOCKADE_PROBE_CACHE"] = "0"
    env["XDG_CONFIG_HOME"] = str(tmp_path / "user-config")
    env["XDG_STATE_HOME"] = str(tmp_path / "user-state")
    return env


def test_cli_project_file_cannot_run_unsandboxed_until_trusted(
    tmp_path: Path, isolated_env: dict[str, str]
) -> None:
    project = tmp_path / "cloned-repo"
    project.mkdir()
    config = project / "stockade.toml"
    config.write_text(ISSUE_FILE)
    escape = ["run", "--rm", "--", "sh", "-c", "echo ran > ran.txt"]

    r = cli("run", "--", "true", cwd=project, env=isolated_env)
    assert r.returncode == 125, r.stderr
    assert f"{config} is not trusted" in r.stderr
    assert "backend = 'host'" in r.stderr and "workspace.mode = 'rw'" in r.stderr
    assert f"run `stockade trust {config}`" in r.stderr
    assert "--backend auto --workspace-mode cow on the command line" in r.stderr
    assert "WARNING" not in r.stderr  # the host backend never started
    r = cli(*escape, cwd=project, env=isolated_env)
    assert r.returncode == 125
    assert not (project / "ran.txt").exists()
    assert json.loads(cli("ls", "--json", cwd=project, env=isolated_env).stdout) == []

    r = cli("trust", cwd=project, env=isolated_env)
    assert r.returncode == 0, r.stderr
    assert f"trusted {config}" in r.stdout
    assert "backend = 'host'" in r.stderr  # what the trust allows is shown
    records = tmp_path / "user-config" / "stockade" / "trusted.json"
    assert stat.S_IMODE(records.stat().st_mode) == 0o600
    assert f"{config}  trusted" in cli("trust", "--list", cwd=project, env=isolated_env).stdout

    r = cli("run", "--rm", "--", "true", cwd=project, env=isolated_env)
    assert r.returncode == 0, r.stderr
    assert "NO isolation" in r.stderr  # the loud warning
    r = cli(*escape, cwd=project, env=isolated_env)
    assert r.returncode == 0, r.stderr
    assert (project / "ran.txt").read_text() == "ran\n"  # rw on the host, as trusted

    config.write_text(ISSUE_FILE + "# changed by someone\n")
    (project / "ran.txt").unlink()
    r = cli(*escape, cwd=project, env=isolated_env)
    assert r.returncode == 125
    assert "has changed since" in r.stderr
    assert not (project / "ran.txt").exists()
    listed = cli("trust", "--list", cwd=project, env=isolated_env).stdout
    assert f"{config}  CHANGED" in listed

    # Flags are the user's word: a safe run needs no trust.
    r = cli("run", "--rm", "--backend", "namespace", "--workspace-mode", "cow", "--", "true",
            cwd=project, env=isolated_env)  # fmt: skip
    assert r.returncode == 0, r.stderr

    assert cli("trust", cwd=project, env=isolated_env).returncode == 0
    assert cli("run", "--rm", "--", "true", cwd=project, env=isolated_env).returncode == 0
    r = cli("trust", "--revoke", str(config), cwd=tmp_path, env=isolated_env)
    assert r.returncode == 0, r.stderr
    assert cli("run", "--rm", "--", "true", cwd=project, env=isolated_env).returncode == 125


def test_cli_refuses_a_dangerous_workspace_and_names_the_option(
    namespace_backend: str, tmp_path: Path, isolated_env: dict[str, str]
) -> None:
    tools = tmp_path / "tools" / "bin"
    tools.mkdir(parents=True)
    isolated_env["PATH"] = f"{tools}:{isolated_env['PATH']}"
    isolated_env["STOCKADE_WORKSPACE_PATH"] = str(tools)
    args = ["run", "--rm", "--backend", namespace_backend, "--workspace-mode", "rw"]
    command = ["--", "sh", "-c", "echo planted > /workspace/git"]
    r = cli(*args, *command, cwd=tmp_path, env=isolated_env)
    assert r.returncode == 125
    assert "holds programs or libraries the host runs" in r.stderr
    assert "--allow-dangerous-mount executables" in r.stderr
    assert not (tools / "git").exists()
    r = cli(*args, "--allow-dangerous-mount", "executables", *command, cwd=tmp_path,
            env=isolated_env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tools / "git").read_text() == "planted\n"


# ---------------------------------------------------------------------------------------------
# The SDK: refused whoever asks, unless the danger is named


@pytest.fixture
def fake_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture
def listening_socket(tmp_path: Path) -> Iterator[Path]:
    """A directory holding a unix socket that answers b'hello' once: a host service."""
    directory = tmp_path / "service"
    directory.mkdir()
    path = directory / "svc.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(60)

    def answer() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.sendall(b"hello")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    yield directory
    server.close()
    thread.join(timeout=5)


@pytest.fixture
def dangerous_dir(
    fake_home: Path, tmp_path: Path, listening_socket: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[[str], Path]:
    """The directory a CASES name stands for (made if missing); tmp_path/tools/bin is put on
    PATH, so that it is the "dir on PATH"."""
    monkeypatch.setenv("PATH", f"{tmp_path / 'tools' / 'bin'}:{os.environ['PATH']}")

    def resolve(which: str) -> Path:
        if which == "~/.config":
            path = fake_home / ".config"
        elif which == "~/.local/bin":
            path = fake_home / ".local" / "bin"
        elif which == "dir on PATH":
            path = tmp_path / "tools" / "bin"
        elif which == "socket dir":
            return listening_socket
        else:
            return Path(which)
        path.mkdir(parents=True, exist_ok=True)
        return path

    return resolve


CASES = [
    ("~/.config", "credentials"),
    ("~/.local/bin", "executables"),
    ("/usr/local/bin", "executables"),
    ("dir on PATH", "executables"),
    ("/run/user", "sockets"),
    ("socket dir", "sockets"),
]


@pytest.mark.parametrize(("which", "kind"), CASES, ids=[c[0] for c in CASES])
def test_sdk_refuses_dangerous_rw_workspaces_without_the_force_option(
    namespace_backend: str, which: str, kind: str, dangerous_dir: Callable[[str], Path]
) -> None:
    path = dangerous_dir(which)
    if not path.is_dir():
        pytest.skip(f"{path} does not exist on this machine")
    with pytest.raises(PolicyError) as info:
        Sandbox.create(
            backend=namespace_backend, workspace_mode="rw", config={"workspace.path": str(path)}
        )
    message = str(info.value)
    assert f"allow_dangerous_mounts = ['{kind}']" in message
    assert f"--allow-dangerous-mount {kind}" in message
    assert StateStore().list() == []  # refused before anything was made


@pytest.mark.parametrize("which", ["~/.config", "~/.local/bin", "dir on PATH", "socket dir"])
def test_sdk_shares_a_dangerous_directory_when_the_danger_is_named(
    namespace_backend: str, which: str, dangerous_dir: Callable[[str], Path]
) -> None:
    path = dangerous_dir(which)
    kind = dict(CASES)[which]
    with Sandbox.create(
        backend=namespace_backend,
        workspace_mode="rw",
        config={"workspace.path": str(path), "allow_dangerous_mounts": [kind]},
    ) as sb:
        assert sb.policy.allow_dangerous_mounts == (kind,)
        r = sb.commands.run("echo inside > /workspace/written")
        assert r.exit_code == 0, r.stderr
        if which == "socket dir":
            # Why sockets are refused: the host service answers the sandbox.
            r = sb.commands.run(
                [
                    "python3",
                    "-c",
                    "import socket; s = socket.socket(socket.AF_UNIX); "
                    "s.connect('/workspace/svc.sock'); print(s.recv(5).decode())",
                ]
            )
            assert r.stdout.strip() == "hello", r.stderr
    assert (path / "written").read_text() == "inside\n"


@pytest.mark.parametrize("which", ["/usr/local/bin", "/run/user"])
def test_sdk_accepts_system_dirs_when_the_danger_is_named(
    which: str, fake_home: Path, tmp_path: Path
) -> None:
    # The policy is accepted; no sandbox writes into the real system directory here.
    from stockade.config import load_config
    from stockade.policy import compile_policy

    if not Path(which).is_dir():  # /run/user exists only where a login manager made it
        pytest.skip(f"{which} does not exist on this machine")
    kind = dict(CASES)[which]
    loaded = load_config(
        tmp_path,
        overrides={
            "workspace.mode": "rw",
            "workspace.path": which,
            "allow_dangerous_mounts": [kind],
        },
    )
    assert compile_policy(loaded).workspace.host_path == Path(which).resolve()
