"""Generate the JSON schema of every protocol message from the models.

``python -m stockade.protocol.schema > src/stockade/protocol/schema.json`` regenerates the
checked-in copy; a contract test fails when the two differ, so the protocol cannot drift by
accident (bump PROTOCOL_VERSION when it changes on purpose).
"""

from __future__ import annotations

import json
from typing import Any

from stockade.protocol.messages import (
    CONTROL_METHODS,
    HOST_NOTIFICATIONS,
    METHODS,
    NOTIFICATIONS,
    PROTOCOL_VERSION,
)

__all__ = ["protocol_schema", "render"]


def protocol_schema() -> dict[str, Any]:
    """One document: every method's params and result, every notification's params, and
    the supervisor's control methods."""
    return {
        "protocol": PROTOCOL_VERSION,
        "framing": "4-byte big-endian length, then UTF-8 JSON (JSON-RPC 2.0)",
        "methods": {
            name: {
                "params": params.model_json_schema(),
                "result": result.model_json_schema(),
            }
            for name, (params, result) in sorted(METHODS.items())
        },
        "notifications": {
            name: {"params": model.model_json_schema()}
            for name, model in sorted(NOTIFICATIONS.items())
        },
        "host_notifications": {
            name: {"params": model.model_json_schema()}
            for name, model in sorted(HOST_NOTIFICATIONS.items())
        },
        # A supervisor's control socket: the methods above (relayed to the agent) and these.
        "control_methods": {
            name: {
                "params": params.model_json_schema(),
                "result": result.model_json_schema(),
            }
            for name, (params, result) in sorted(CONTROL_METHODS.items())
        },
    }


def render() -> str:
    return json.dumps(protocol_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(render(), end="")
