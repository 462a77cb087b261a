"""A config test's world: a home, an XDG config dir and a project, all under tmp_path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stockade.config import LoadedConfig, load_config


class World:
    """A home, an XDG config dir and a project, all under tmp_path; no real environment."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.home = tmp_path / "home"
        self.project = self.home / "proj"
        self.project.mkdir(parents=True)
        self.xdg = tmp_path / "xdg"
        self.user_file = self.xdg / "stockade" / "config.toml"
        self.environ: dict[str, str] = {
            "HOME": str(self.home),
            "XDG_CONFIG_HOME": str(self.xdg),
        }

    def write_user(self, text: str) -> Path:
        self.user_file.parent.mkdir(parents=True, exist_ok=True)
        self.user_file.write_text(text)
        return self.user_file

    def write_project(self, text: str, name: str = "stockade.toml") -> Path:
        path = self.project / name
        path.write_text(text)
        return path

    def load(self, start: Path | None = None, **kwargs: Any) -> LoadedConfig:
        kwargs.setdefault("environ", self.environ)
        return load_config(self.project if start is None else start, **kwargs)
