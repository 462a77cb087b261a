"""The hash-chained audit log: chain, tamper detection, concurrent appends, redaction."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from stockade._errors import ConfigError, SandboxStateError
from stockade.audit import GENESIS, AuditLog, redact


def _fill(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.append("process.started", target=f"cmd-{i}", details={"argv": ["echo", str(i)]})


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(lines))


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    return AuditLog(tmp_path / "sb" / "audit.jsonl", "sb-1")


def test_events_form_a_chain_that_verifies(log: AuditLog) -> None:
    first = log.append("sandbox.created", details={"policy_hash": "abc"})
    second = log.append(
        "egress.denied", actor="agent", target="evil.com:443", decision="deny", rule="default"
    )
    assert (first.seq, first.prev) == (0, GENESIS)
    assert (second.seq, second.prev) == (1, first.hash)
    assert len(first.hash) == 64 and first.hash != second.hash
    assert first.time.endswith("Z") and "." in first.time
    assert log.read() == [first, second]
    result = log.verify()
    assert result.ok and result.events == 2 and result.first_bad_seq is None


def test_file_is_private_and_lines_are_canonical_json(log: AuditLog) -> None:
    event = log.append("sandbox.created")
    assert stat.S_IMODE(log.path.stat().st_mode) == 0o600
    line = log.path.read_text()
    assert line == event.to_json() + "\n"
    assert json.loads(line)["hash"] == event.hash


def test_reopening_continues_the_chain(log: AuditLog) -> None:
    _fill(log, 3)
    again = AuditLog(log.path, "sb-1")
    event = again.append("process.exited", details={"exit_code": 0})
    assert event.seq == 3
    assert again.verify().ok


def test_empty_or_missing_log_verifies(log: AuditLog) -> None:
    assert log.read() == []
    assert log.verify().ok


def test_editing_a_line_is_detected_at_its_seq(log: AuditLog) -> None:
    _fill(log, 5)
    lines = _lines(log.path)
    lines[2] = lines[2].replace("cmd-2", "cmd-X")
    _write_lines(log.path, lines)
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 2 and result.events == 2
    assert "modified" in result.reason


def test_editing_and_rehashing_a_line_is_detected_at_the_next(log: AuditLog) -> None:
    _fill(log, 5)
    lines = _lines(log.path)
    obj = json.loads(lines[2])
    obj["target"] = "cmd-X"
    del obj["hash"]
    canon = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    obj["hash"] = hashlib.sha256(canon.encode()).hexdigest()
    lines[2] = json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n"
    _write_lines(log.path, lines)
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 3
    assert "prev" in result.reason


def test_deleting_a_line_is_detected(log: AuditLog) -> None:
    _fill(log, 5)
    lines = _lines(log.path)
    del lines[1]
    _write_lines(log.path, lines)
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 1
    assert "seq" in result.reason


def test_reordering_lines_is_detected(log: AuditLog) -> None:
    _fill(log, 5)
    lines = _lines(log.path)
    lines[2], lines[3] = lines[3], lines[2]
    _write_lines(log.path, lines)
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 2


def test_inserting_a_line_is_detected(log: AuditLog) -> None:
    _fill(log, 4)
    lines = _lines(log.path)
    lines.insert(2, lines[1])  # a replayed event
    _write_lines(log.path, lines)
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 2


def test_garbage_line_is_detected(log: AuditLog) -> None:
    _fill(log, 3)
    lines = _lines(log.path)
    lines.insert(1, "not json\n")
    _write_lines(log.path, lines)
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 1
    assert "not a valid audit event" in result.reason


def test_torn_last_line_is_closed_and_reported(log: AuditLog) -> None:
    _fill(log, 3)
    with open(log.path, "a") as f:
        f.write('{"seq":3,"ti')  # a crash in the middle of a write
    event = log.append("sandbox.stopped")
    assert event.seq == 3  # continues from the last complete event
    lines = _lines(log.path)
    assert lines[3] == '{"seq":3,"ti\n'
    assert json.loads(lines[4])["seq"] == 3
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 3


def test_damaged_last_event_refuses_to_append(log: AuditLog) -> None:
    _fill(log, 2)
    lines = _lines(log.path)
    lines[-1] = '{"seq": "x"}\n'
    _write_lines(log.path, lines)
    with pytest.raises(SandboxStateError, match="damaged"):
        log.append("sandbox.stopped")


def test_event_from_another_sandbox_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    AuditLog(path, "other").append("sandbox.created")
    result = AuditLog(path, "mine").verify()
    assert not result.ok and result.first_bad_seq == 0


def test_invalid_action_or_actor_is_refused(log: AuditLog) -> None:
    with pytest.raises(ConfigError, match="action"):
        log.append("Created Sandbox")
    with pytest.raises(ConfigError, match="actor"):
        log.append("sandbox.created", actor="Root User")


def _append_many(path: str, worker: int, count: int) -> None:
    log = AuditLog(Path(path), "sb-1")
    for i in range(count):
        log.append("file.written", actor="sdk", target=f"w{worker}-{i}", details={"i": i})


def test_concurrent_appends_from_two_processes_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(path), w, 150)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    log = AuditLog(path, "sb-1")
    result = log.verify()
    assert result.ok, result.reason
    events = log.read()
    assert len(events) == 300
    assert {e.target for e in events} == {f"w{w}-{i}" for w in range(2) for i in range(150)}


def test_redact_drops_secret_keys_at_any_depth() -> None:
    details = {
        "argv": ["curl", "https://example.com"],
        "env": {"OPENAI_API_KEY": "sk-123"},
        "Env_Vars": ["A=1"],
        "api_token": "t",
        "password": "p",
        "data": "payload",
        "content": "file body",
        "nested": {"secret_value": "s", "ok": 1, "list": [{"Authorization": "Bearer x", "n": 2}]},
        "stdout": "output",
        "bytes": 12,
        "blob": b"\x00\x01",
        "path": Path("/x"),
    }
    assert redact(details) == {
        "argv": ["curl", "https://example.com"],
        "nested": {"ok": 1, "list": [{"n": 2}]},
        "bytes": 12,
        "blob": "<2 bytes>",
        "path": "/x",
    }
    assert redact(None) == {}


def test_append_applies_redaction(log: AuditLog) -> None:
    event = log.append("process.started", details={"argv": ["env"], "env": {"TOKEN": "sk-live-1"}})
    assert event.details == {"argv": ["env"]}
    assert "sk-live-1" not in log.path.read_text()


def test_symlinked_log_path_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    link = tmp_path / "audit.jsonl"
    os.symlink(target, link)
    with pytest.raises(OSError):
        AuditLog(link, "sb").append("sandbox.created")
