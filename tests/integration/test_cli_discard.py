"""Nothing is discarded silently, and nothing is left behind: `run --rm` says what it threw
away, `rm` of unapplied changes asks or needs --force, failed creates leave no directory or
record, and `ls --all` / `doctor --fix` find and remove leftovers. Real CLI, namespace backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from test_cli import on_a_terminal, status_of, stockade

pytestmark = pytest.mark.timeout(300)


def state_dir() -> Path:
    return Path(os.environ["STOCKADE_STATE_DIR"])


def sandbox_dirs() -> list[str]:
    root = state_dir() / "sandboxes"
    return sorted(os.listdir(root)) if root.exists() else []


def records() -> dict[str, dict[str, object]]:
    return {r["name"]: r for r in json.loads(stockade("ls", "--json").stdout)}


def test_run_rm_says_what_it_discarded(namespace_backend: str, project: Path) -> None:
    r = stockade("run", "--rm", "--", "sh", "-c",
                 "echo x > a.txt; mkdir -p new/deep; echo y > new/deep/f; rm README.md",
                 cwd=project)  # fmt: skip
    assert "discarded 3 changed files of sandbox " in r.stderr
    assert r.stderr.rstrip().endswith(": README.md, a.txt, new/ (--rm)")
    r = stockade("run", "--rm", "--", "true", cwd=project)
    assert "no changes discarded (--rm)" in r.stderr
    assert records() == {} and sandbox_dirs() == []


def test_rm_of_unapplied_changes_needs_force(namespace_backend: str, project: Path) -> None:
    name = f"u-{uuid.uuid4().hex[:8]}"
    stockade("run", "--name", name, "--", "sh", "-c",
             "echo x > a.txt; mkdir new; echo y > new/f", cwd=project)  # fmt: skip
    sandbox_id = str(records()[name]["id"])
    for args in (["rm", name], ["rm", "--all"]):
        r = stockade(*args, check=False, input="")  # stdin is no terminal
        assert r.returncode == 125, r.stderr
        assert f"sandbox {name} has 2 unapplied changes (a.txt, new/)" in r.stderr
        assert f"`stockade diff {name}`" in r.stderr and f"`stockade apply {name}`" in r.stderr
        again = "--all" if "--all" in args else name
        assert f"`stockade rm --force {again}`" in r.stderr
        assert name in records() and sandbox_dirs() == [sandbox_id]

    stockade("apply", name, "a.txt", cwd=project)
    r = stockade("rm", name, check=False, input="")  # stdin is no terminal
    assert r.returncode == 125 and "has 1 unapplied change (new/)" in r.stderr
    stockade("apply", name, cwd=project)
    stockade("rm", name, input="")  # everything applied: nothing to ask about
    assert records() == {} and sandbox_dirs() == []

    stockade("run", "--name", name, "--", "sh", "-c", "echo z > z.txt", cwd=project)
    assert stockade("rm", "--force", name).stdout == f"{name}\n"
    assert records() == {} and sandbox_dirs() == []
    assert not (project / "z.txt").exists()


def test_rm_asks_on_a_terminal(namespace_backend: str, project: Path) -> None:
    name = f"t-{uuid.uuid4().hex[:8]}"
    stockade("run", "--name", name, "--", "sh", "-c", "echo x > a.txt", cwd=project)
    text = on_a_terminal("rm", name, answer=b"n")[0]
    assert f"sandbox {name} has 1 unapplied change (a.txt); remove it and discard them?" in text
    assert f"kept {name}" in text
    assert name in records()
    text = on_a_terminal("rm", name, answer=b"y")[0]
    assert name not in records() and sandbox_dirs() == []


def _failing(kind: str, project: Path, command: str) -> list[str]:
    """CLI arguments for a `create`/`run`/`run --rm` that fails in the way ``kind`` says."""
    head = {"create": ["create"], "run": ["run"], "run --rm": ["run", "--rm"]}[command]
    tail = [] if command == "create" else ["--", "true"]
    if kind == "collision":
        return [*head, "--name", "taken", "-C", str(project), *tail]
    if kind == "invalid name":
        return [*head, "--name", "Bad/../name", "-C", str(project), *tail]
    if kind == "missing secret":
        (project / "stockade.toml").write_text(
            '[secrets.TOKEN]\nenv = "STOCKADE_TEST_UNSET_SECRET"\nhosts = ["example.com"]\n'
        )
        stockade("trust", str(project / "stockade.toml"))  # [secrets] need a trusted file
    if kind == "backend start":
        # bwrap cannot make a mount point inside a file: the sandbox never comes up.
        (project / "stockade.toml").write_text('[workspace]\nmount = "/etc/passwd/ws"\n')
    return [*head, "--name", "fresh", "-C", str(project), *tail]


@pytest.mark.parametrize("command", ["create", "run", "run --rm"])
@pytest.mark.parametrize("kind", ["collision", "invalid name", "missing secret", "backend start"])
def test_failed_creates_leave_nothing(
    namespace_backend: str,
    project: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    command: str,
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    stockade("create", "--name", "taken", "-C", str(other))
    try:
        taken_id = str(records()["taken"]["id"])
        (state_dir() / "sandboxes" / taken_id / "upper" / "mine.txt").write_text("keep me\n")
        monkeypatch.delenv("STOCKADE_TEST_UNSET_SECRET", raising=False)
        r = stockade(*_failing(kind, project, command), cwd=project, check=False)
        assert r.returncode == 125, r.stdout + r.stderr
        assert "Traceback" not in r.stderr
        expected = {
            "collision": "a sandbox named 'taken' already exists",
            "invalid name": "invalid sandbox name",
            "missing secret": "STOCKADE_TEST_UNSET_SECRET is not set",
            "backend start": "did not start",
        }[kind]
        assert expected in r.stderr
        # Nothing of the failed sandbox, and the other one untouched.
        assert list(records()) == ["taken"] and sandbox_dirs() == [taken_id]
        assert status_of("taken") == "running"
        upper = state_dir() / "sandboxes" / taken_id / "upper"
        assert (upper / "mine.txt").read_text() == "keep me\n"
        assert stockade("exec", "taken", "--", "true").returncode == 0
    finally:
        stockade("rm", "--force", "taken", check=False)


def test_leftovers_are_listed_and_fixed(namespace_backend: str, project: Path) -> None:
    live = f"l-{uuid.uuid4().hex[:8]}"
    gone = f"g-{uuid.uuid4().hex[:8]}"
    stockade("create", "--name", live, "-C", str(project))
    try:
        stockade("run", "--name", gone, "--", "true", cwd=project)
        gone_dir = state_dir() / "sandboxes" / str(records()[gone]["id"])
        from stockade.workspace.removal import remove_tree

        remove_tree(gone_dir)  # a record whose directory is gone
        stray = state_dir() / "sandboxes" / "0123456789abcdef"  # a directory with no record
        (stray / "upper" / "deep").mkdir(parents=True)
        (stray / "upper" / "deep" / "f").write_text("left\n")
        (stray / "upper" / "deep").chmod(0o500)

        assert "2 leftovers of removed or failed sandboxes" in stockade("ls").stdout
        listed = stockade("ls", "--all").stdout
        assert f"directory {stray} (no sandbox record)" in listed
        assert f"record of sandbox {gone} (stopped; its directory {gone_dir} is gone)" in listed
        rows = json.loads(stockade("ls", "--all", "--json").stdout)
        orphans = {(r["kind"], r["sandbox"]) for r in rows if r["status"] == "orphan"}
        assert orphans == {("directory", stray.name), ("record", gone_dir.name)}
        report = json.loads(stockade("doctor", "--no-measure", "--json").stdout)["state"]
        assert {row["kind"] for row in report["leftovers"]} == {"directory", "record"}
        assert not any(row["removed"] for row in report["leftovers"])

        fixed = json.loads(stockade("doctor", "--no-measure", "--fix", "--json").stdout)
        assert all(row["removed"] for row in fixed["state"]["leftovers"])
        assert not stray.exists() and gone not in records()
        assert "leftovers of sandboxes: none" in stockade("doctor", "--no-measure").stdout
        assert "leftover" not in stockade("ls", "--all").stdout
        # The live sandbox was never a leftover.
        assert status_of(live) == "running"
        assert stockade("exec", live, "--", "true").returncode == 0
    finally:
        stockade("rm", "--force", live, check=False)


def test_a_mounted_leftover_is_kept(namespace_backend: str, project: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs into a leftover directory needs root")
    stray = state_dir() / "sandboxes" / "fedcba9876543210"
    (stray / "merged").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(stray / "merged")],
                   check=True)  # fmt: skip
    try:
        (stray / "merged" / "inside.txt").write_text("not to be deleted through the mount\n")
        fixed = json.loads(stockade("doctor", "--no-measure", "--fix", "--json").stdout)
        [row] = fixed["state"]["leftovers"]
        assert row["removable"] is False and not row["removed"]
        assert "mounted" in row["why_not"] and "umount -l" in row["why_not"]
        assert (stray / "merged" / "inside.txt").exists()
    finally:
        subprocess.run(["umount", "-l", str(stray / "merged")], check=False)
    fixed = json.loads(stockade("doctor", "--no-measure", "--fix", "--json").stdout)
    assert [row["removed"] for row in fixed["state"]["leftovers"]] == [True]
    assert not stray.exists()
