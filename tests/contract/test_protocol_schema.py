"""The checked-in protocol schema matches the models: the protocol cannot drift by accident."""

from __future__ import annotations

from pathlib import Path

from stockade.protocol import schema
from stockade.protocol.messages import METHODS, NOTIFICATIONS

SCHEMA_FILE = Path(schema.__file__).with_name("schema.json")


def test_checked_in_schema_is_current() -> None:
    assert SCHEMA_FILE.read_text() == schema.render(), (
        "the protocol models changed; if on purpose, bump PROTOCOL_VERSION as DESIGN.md §3 says "
        "and run: python -m stockade.protocol.schema > src/stockade/protocol/schema.json"
    )


def test_every_design_method_is_defined() -> None:
    design = {
        "agent.hello",
        "agent.shutdown",
        "process.start",
        "process.write_stdin",
        "process.signal",
        "process.resize",
        "process.wait",
        "fs.read",
        "fs.write",
        "fs.stat",
        "fs.list",
        "fs.remove",
        "fs.mkdir",
        "fs.upload_tar",
        "fs.download_tar",
    }
    assert design <= set(METHODS)
    assert {"process.output", "process.exit"} <= set(NOTIFICATIONS)


def test_every_field_is_described() -> None:
    missing = []
    for name, (params, result) in METHODS.items():
        for model in (params, result):
            for field_name, field in model.model_fields.items():
                if not field.description and field.annotation is not None:
                    # B64 / Path aliases carry their description in metadata
                    meta = [m for m in field.metadata if getattr(m, "description", None)]
                    if not meta and field_name not in ("proc",):
                        missing.append(f"{name}: {model.__name__}.{field_name}")
    assert not missing, missing
