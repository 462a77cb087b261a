"""Shared host directories holding credentials, host programs or sockets (policy/mounts.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stockade._errors import PolicyError
from stockade.config import load_config
from stockade.policy import EffectivePolicy, compile_policy
from stockade.policy.mounts import mount_dangers


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    (path / "proj").mkdir(parents=True)
    return path


@pytest.fixture
def environ(home: Path, tmp_path: Path) -> dict[str, str]:
    return {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
        "PATH": f"{tmp_path / 'tools' / 'bin'}:/usr/local/bin:/usr/bin:/bin:relative/bin",
    }


def kinds(path: Path, environ: dict[str, str], home: Path, *, writable: bool = True) -> set[str]:
    mode = "rw" if writable else "ro"
    found = mount_dangers(path, mode=mode, environ=environ, homes=(home,))
    return {d.kind for d in found}


def make(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def unix_socket(tmp_path: Path) -> Iterator[Any]:
    """Bind a unix socket at a path; closed at the end."""
    opened: list[socket.socket] = []

    def bind(path: Path) -> Path:
        make(path.parent)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        opened.append(sock)
        return path

    yield bind
    for sock in opened:
        sock.close()


# ---------------------------------------------------------------------------------------------
# The classifier


def test_an_ordinary_project_is_fine(home: Path, environ: dict[str, str]) -> None:
    (home / "proj" / "src").mkdir()
    (home / "proj" / "src" / "app.py").write_text("print(1)\n")
    assert kinds(home / "proj", environ, home) == set()


@pytest.mark.parametrize(
    "rel",
    [".ssh", ".aws/sso", ".config", ".config/gh", ".gnupg", ".kube", ".docker", ".password-store"],
)
def test_credential_dirs_and_everything_inside_them(
    home: Path, environ: dict[str, str], rel: str
) -> None:
    path = make(home / rel)
    assert "credentials" in kinds(path, environ, home, writable=False)  # reading is enough


def test_a_directory_containing_credentials(home: Path, environ: dict[str, str]) -> None:
    make(home / ".local" / "share" / "keyrings")
    assert "credentials" in kinds(home / ".local" / "share", environ, home, writable=False)
    cargo = make(home / ".cargo")
    assert kinds(cargo, environ, home, writable=False) == set()
    (cargo / "credentials.toml").write_text("[registry]\ntoken = 'x'\n")
    assert kinds(cargo, environ, home, writable=False) == {"credentials"}


def test_credentials_named_by_the_environment(
    home: Path, environ: dict[str, str], tmp_path: Path
) -> None:
    kube = make(tmp_path / "ops" / "kube")
    (kube / "config").write_text("x")
    environ["KUBECONFIG"] = f"{kube / 'config'}:/nonexistent/other"
    assert kinds(kube, environ, home, writable=False) == {"credentials"}
    assert kinds(tmp_path / "ops", environ, home, writable=False) == {"credentials"}
    assert "credentials" in kinds(make(tmp_path / "xdg"), environ, home, writable=False)


def test_stockades_own_state_is_refused(home: Path, environ: dict[str, str]) -> None:
    state = make(home / ".local" / "state" / "stockade")
    assert "credentials" in kinds(state, environ, home, writable=False)


def test_a_symlink_to_credentials_is_followed(
    home: Path, environ: dict[str, str], tmp_path: Path
) -> None:
    make(home / ".ssh")
    link = tmp_path / "innocent"
    link.symlink_to(home / ".ssh")
    assert "credentials" in kinds(link, environ, home, writable=False)


@pytest.mark.parametrize("rel", [".local/bin", ".pyenv/shims", ".cargo/bin", "bin"])
def test_home_program_dirs_are_refused_when_writable(
    home: Path, environ: dict[str, str], rel: str
) -> None:
    path = make(home / rel)
    assert kinds(path, environ, home) == {"executables"}
    assert kinds(path, environ, home, writable=False) == set()  # reading programs is harmless


def test_dirs_on_path_their_insides_and_their_parents(
    home: Path, environ: dict[str, str], tmp_path: Path
) -> None:
    on_path = make(tmp_path / "tools" / "bin")
    assert kinds(on_path, environ, home) == {"executables"}
    assert kinds(make(on_path / "sub"), environ, home) == {"executables"}
    assert kinds(tmp_path / "tools", environ, home) == {"executables"}
    environ["PATH"] = "/usr/bin"
    assert kinds(tmp_path / "tools", environ, home) == set()


def test_a_project_whose_venv_is_on_path_is_refused_rw(home: Path, environ: dict[str, str]) -> None:
    venv_bin = make(home / "proj" / ".venv" / "bin")
    environ["PATH"] = f"{venv_bin}:/usr/bin"
    assert kinds(home / "proj", environ, home) == {"executables"}
    assert kinds(home / "proj", environ, home, writable=False) == set()


def test_system_program_dirs(home: Path, environ: dict[str, str]) -> None:
    assert kinds(Path("/usr/local/bin"), environ, home) == {"executables"}
    environ["PATH"] = ""
    assert kinds(Path("/usr/local/bin"), environ, home) == {"executables"}  # well known


@pytest.mark.parametrize("path", ["/run", "/run/user", "/var/run", "/run/user/1000"])
def test_socket_directories(home: Path, environ: dict[str, str], path: str) -> None:
    assert "sockets" in kinds(Path(path), environ, home, writable=False)


def test_sockets_named_by_the_environment(
    home: Path, environ: dict[str, str], tmp_path: Path
) -> None:
    docker = make(tmp_path / "dockerd")
    environ["DOCKER_HOST"] = f"unix://{docker / 'docker.sock'}"
    assert kinds(docker, environ, home, writable=False) == {"sockets"}
    agent = make(tmp_path / "agent")
    environ["SSH_AUTH_SOCK"] = str(agent / "S.ssh")
    assert kinds(agent, environ, home, writable=False) == {"sockets"}


def test_a_socket_found_below(home: Path, environ: dict[str, str], unix_socket: Any) -> None:
    project = home / "proj"
    unix_socket(project / "pgdata" / ".s.PGSQL.5432")
    found = mount_dangers(project, mode="ro", environ=environ, homes=(home,))
    assert [d.kind for d in found] == ["sockets"]
    assert ".s.PGSQL.5432 is a unix socket" in found[0].reason


def test_the_socket_walk_is_bounded(home: Path, environ: dict[str, str], unix_socket: Any) -> None:
    project = home / "proj"
    unix_socket(project / "a" / "b" / "c" / "s")
    assert kinds(project, environ, home, writable=False) == {"sockets"}
    found = mount_dangers(project, mode="ro", environ=environ, homes=(home,), walk_depth=1)
    assert found == []  # deeper than the walk goes: not seen, as documented
    for i in range(20):
        (project / f"f{i}").write_text("")
    found = mount_dangers(project, mode="ro", environ=environ, homes=(home,), walk_entries=10)
    assert found == []


def test_a_cow_workspace_is_not_walked_for_sockets(
    home: Path, environ: dict[str, str], unix_socket: Any
) -> None:
    # Through overlayfs a host socket answers nothing (tests/contract: every backend).
    project = home / "proj"
    unix_socket(project / ".git" / "fsmonitor--daemon.ipc")
    assert mount_dangers(project, mode="cow", environ=environ, homes=(home,)) == []
    assert kinds(project, environ, home, writable=False) == {"sockets"}
    assert [d.kind for d in mount_dangers(Path("/run/user"), mode="cow", environ=environ,
                                          homes=(home,))] == ["sockets"]  # fmt: skip


def test_fifos_and_symlinks_to_sockets_are_not_sockets(
    home: Path, environ: dict[str, str], tmp_path: Path, unix_socket: Any
) -> None:
    import os

    project = home / "proj"
    os.mkfifo(project / "fifo")
    target = unix_socket(tmp_path / "elsewhere" / "s")
    (project / "link").symlink_to(target)  # resolved inside the sandbox, where it is not
    assert kinds(project, environ, home, writable=False) == set()


def test_every_danger_is_reported(home: Path, environ: dict[str, str]) -> None:
    make(home / ".local" / "bin")
    make(home / ".local" / "share" / "keyrings")
    assert kinds(home / ".local", environ, home) == {"credentials", "executables"}


# ---------------------------------------------------------------------------------------------
# Policy compilation: every front end, whoever asks


def compile_at(path: Path, environ: dict[str, str], **overrides: Any) -> EffectivePolicy:
    loaded = load_config(
        path.parent, environ=environ, overrides={"workspace.path": path, **overrides}
    )
    return compile_policy(loaded, environ=environ)


def test_compile_refuses_and_names_the_force_option(home: Path, environ: dict[str, str]) -> None:
    config_dir = make(home / ".config")
    with pytest.raises(PolicyError) as info:
        compile_at(config_dir, environ, **{"workspace.mode": "rw"})
    message = str(info.value)
    assert f"workspace.path = '{config_dir}' (from argument overrides['workspace.path'])" in message
    assert "holds credentials" in message and "could read them" in message
    assert "allow_dangerous_mounts = ['credentials']" in message
    assert "--allow-dangerous-mount credentials" in message

    policy = compile_at(
        config_dir, environ, **{"workspace.mode": "rw", "allow_dangerous_mounts": ["credentials"]}
    )
    assert policy.workspace.host_path == config_dir
    assert policy.allow_dangerous_mounts == ("credentials",)
    assert EffectivePolicy.from_json(policy.to_json()) == policy


def test_compile_needs_every_danger_named(home: Path, environ: dict[str, str]) -> None:
    make(home / ".local" / "bin")
    make(home / ".local" / "share" / "keyrings")
    local = home / ".local"
    with pytest.raises(PolicyError, match=r"\['credentials', 'executables'\]"):
        compile_at(local, environ, **{"workspace.mode": "rw"})
    with pytest.raises(PolicyError, match=r"= \['executables'\]"):
        compile_at(
            local, environ, **{"workspace.mode": "rw", "allow_dangerous_mounts": ["credentials"]}
        )
    compile_at(
        local,
        environ,
        **{"workspace.mode": "rw", "allow_dangerous_mounts": ["credentials", "executables"]},
    )


def test_compile_refuses_from_the_users_own_file_too(
    home: Path, environ: dict[str, str], tmp_path: Path
) -> None:
    bin_dir = make(home / ".local" / "bin")
    user_file = tmp_path / "xdg" / "stockade" / "config.toml"
    user_file.parent.mkdir(parents=True)
    user_file.write_text(f'[workspace]\nmode = "rw"\npath = "{bin_dir}"\n')
    with pytest.raises(PolicyError, match="holds programs or libraries the host runs"):
        compile_policy(load_config(home / "proj", environ=environ), environ=environ)
    user_file.write_text('allow_dangerous_mounts = ["executables"]\n' + user_file.read_text())
    compile_policy(load_config(home / "proj", environ=environ), environ=environ)


def test_compile_checks_a_host_directory_used_as_root(home: Path, environ: dict[str, str]) -> None:
    make(home / ".ssh")
    with pytest.raises(PolicyError, match=r"gvisor.image = .* holds credentials"):
        compile_at(home / "proj", environ, **{"gvisor.image": str(home / ".ssh")})


def test_no_workspace_no_check(home: Path, environ: dict[str, str]) -> None:
    compile_at(make(home / ".ssh"), environ, **{"workspace.mode": "none"})
