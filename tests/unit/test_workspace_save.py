"""The record of how fresh the host's copy of a guest-held workspace is (workspace/save.py)."""

from __future__ import annotations

from pathlib import Path

from stockade.workspace.save import WorkspaceSave, lost_message, lost_save, read_save, write_save


def test_no_record_means_nothing_can_be_lost(tmp_path: Path) -> None:
    assert read_save(tmp_path) is None
    assert lost_save(tmp_path, running=False) is None


def test_pending_is_lost_only_once_the_sandbox_no_longer_runs(tmp_path: Path) -> None:
    write_save(tmp_path, WorkspaceSave("pending", 1000.0))
    assert lost_save(tmp_path, running=True) is None
    lost = lost_save(tmp_path, running=False)
    assert lost is not None and lost.saved_at == 1000.0
    assert lost.reason is not None and "killed" in lost.reason


def test_saved_and_lost_records(tmp_path: Path) -> None:
    write_save(tmp_path, WorkspaceSave("saved", 2000.0))
    assert lost_save(tmp_path, running=False) is None
    write_save(tmp_path, WorkspaceSave("lost", 2000.0, "the VM crashed"))
    assert lost_save(tmp_path, running=False) == WorkspaceSave("lost", 2000.0, "the VM crashed")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_damaged_record_reads_as_none(tmp_path: Path) -> None:
    (tmp_path / "workspace-save.json").write_text('{"state": "weird", "saved_at": 1}')
    assert read_save(tmp_path) is None
    (tmp_path / "workspace-save.json").write_text("not json")
    assert read_save(tmp_path) is None


def test_the_message_says_what_was_lost_and_escapes_what_the_guest_wrote() -> None:
    save = WorkspaceSave("lost", 0.0, "packer said: ok\r\x1b[2Kfine\udcff")
    message = lost_message("box", save)
    assert message.startswith("the workspace changes of box could not be saved when it stopped")
    assert "what is shown is the last saved state, from 19" in message
    assert "\r" not in message and "\x1b" not in message and "\udcff" not in message
    assert "\\r\\x1b[2Kfine" in message
