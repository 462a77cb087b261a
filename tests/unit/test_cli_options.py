"""Command-line options checked before anything runs (no sandbox needed)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from stockade.cli.main import _env_map, cli


@pytest.mark.parametrize("bad", ["NOVALUE", "=value"])
@pytest.mark.parametrize("command", ["exec", "run"])
def test_env_option_must_be_name_equals_value(command: str, bad: str) -> None:
    # Checked before the sandbox is looked up: no sandbox named some-box exists.
    args = ["exec", "-e", bad, "some-box"] if command == "exec" else ["run", "--rm", "-e", bad]
    result = CliRunner().invoke(cli, [*args, "--", "true"])
    assert result.exit_code == 2, result.output
    assert f"'{bad}' is not NAME=VALUE" in result.output
    assert "'-e' / '--env'" in result.output


def test_env_values_keep_their_equals_signs() -> None:
    assert _env_map(["A=b=c", "EMPTY="]) == {"A": "b=c", "EMPTY": ""}
