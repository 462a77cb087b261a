"""Named sets of egress rules for the common cases: ``[network] presets = ["github", ...]``.

``python-packages`` and ``npm`` read the host's own pip and npm configuration (index URLs,
mirrors, scoped registries), so a company mirror needs no extra rule; the others are fixed
host lists. Nothing here reads global state: the environment, the home directory, the
project directory and the system root are parameters.
"""

from __future__ import annotations

import configparser
import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from stockade._errors import ConfigError
from stockade.policy.rules import RuleError, parse_rule

__all__ = [
    "PRESETS",
    "PresetHosts",
    "preset_problem",
    "resolve_presets",
]

#: Every preset, with what it opens.
PRESETS: Mapping[str, str] = {
    "python-packages": (
        "the package indexes of the host's pip configuration (PIP_INDEX_URL, pip.conf, ...); "
        "pypi.org and files.pythonhosted.org when none is configured"
    ),
    "npm": (
        "the registries of the host's npm configuration (npm_config_registry, .npmrc, "
        "@scope:registry); registry.npmjs.org when none is configured"
    ),
    "github": "github.com and its API, archive and raw-content hosts (443), git over SSH (22)",
    "anthropic": "the Anthropic API (api.anthropic.com)",
    "openai": "the OpenAI API (api.openai.com)",
    "google-gemini": "the Gemini API (generativelanguage.googleapis.com)",
    "mistral": "the Mistral AI API (api.mistral.ai)",
    "groq": "the Groq API (api.groq.com)",
    "openrouter": "the OpenRouter API (openrouter.ai)",
    "deepseek": "the DeepSeek API (api.deepseek.com)",
    "xai": "the xAI API (api.x.ai)",
    "together": "the Together AI API (api.together.xyz)",
    "fireworks": "the Fireworks AI API (api.fireworks.ai)",
    "cohere": "the Cohere API (api.cohere.com)",
}

# name -> (allow entries, tcp entries)
_FIXED: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "github": (
        (
            "github.com:443",
            "api.github.com:443",
            "codeload.github.com:443",
            "objects.githubusercontent.com:443",
            "raw.githubusercontent.com:443",
        ),
        ("github.com:22",),
    ),
    "anthropic": (("api.anthropic.com:443",), ()),
    "openai": (("api.openai.com:443",), ()),
    "google-gemini": (("generativelanguage.googleapis.com:443",), ()),
    "mistral": (("api.mistral.ai:443",), ()),
    "groq": (("api.groq.com:443",), ()),
    "openrouter": (("openrouter.ai:443",), ()),
    "deepseek": (("api.deepseek.com:443",), ()),
    "xai": (("api.x.ai:443",), ()),
    "together": (("api.together.xyz:443",), ()),
    "fireworks": (("api.fireworks.ai:443",), ()),
    "cohere": (("api.cohere.com:443",), ()),
}

_PIP_KEYS = ("index-url", "extra-index-url", "find-links", "trusted-host")
_PYPI_FILES = {"pypi.org": "files.pythonhosted.org", "test.pypi.org": "test-files.pythonhosted.org"}
_DEFAULT_PORTS = {"https": 443, "http": 80}
_NPM_DEFAULT = "registry.npmjs.org:443"
_NPM_VAR_RE = re.compile(r"\$\{([^}]*)\}")


@dataclass(frozen=True)
class PresetHosts:
    """The rules the selected presets add, and where each one came from."""

    allow: tuple[str, ...] = ()
    tcp: tuple[str, ...] = ()
    #: rule -> where it came from: "preset github", "preset python-packages: PIP_INDEX_URL".
    #: Sources name files and variables, never their values (an index URL may hold a token).
    sources: dict[str, str] = field(default_factory=dict)


def preset_problem(name: str) -> str | None:
    """Why ``name`` is not a preset (with the closest one and the list), or None if it is."""
    if name in PRESETS:
        return None
    close = difflib.get_close_matches(name, list(PRESETS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown network preset {name!r}; {hint}known presets: {', '.join(PRESETS)}"


def resolve_presets(
    names: Iterable[str],
    *,
    environ: Mapping[str, str],
    home: Path,
    project_dir: Path | None = None,
    system_root: Path = Path("/"),
) -> PresetHosts:
    """The allow and tcp rules of the presets ``names``, in order, without duplicates.

    ``environ`` and ``home`` are the host's (pip and npm settings are read from them),
    ``project_dir`` holds the project's ``.npmrc``, and system files such as
    ``/etc/pip.conf`` are read under ``system_root``. Raises ConfigError for an unknown
    preset or an unreadable pip/npm configuration.
    """
    allow: dict[str, str] = {}
    tcp: dict[str, str] = {}
    for name in names:
        problem = preset_problem(name)
        if problem:
            raise ConfigError(f"{problem}; fix [network] presets")
        if name == "python-packages":
            found = _pip_rules(environ, home, project_dir, system_root)
        elif name == "npm":
            found = _npm_rules(environ, home, project_dir)
        else:
            fixed_allow, fixed_tcp = _FIXED[name]
            found = [(entry, "") for entry in fixed_allow]
            for entry in fixed_tcp:
                tcp.setdefault(entry, f"preset {name}")
        for entry, where in found:
            allow.setdefault(entry, f"preset {name}: {where}" if where else f"preset {name}")
    return PresetHosts(allow=tuple(allow), tcp=tuple(tcp), sources={**allow, **tcp})


# ---------------------------------------------------------------------------------------------
# pip


def _pip_rules(
    environ: Mapping[str, str], home: Path, project_dir: Path | None, system_root: Path
) -> list[tuple[str, str]]:
    settings = _pip_settings(environ, home, project_dir, system_root)
    rules: list[tuple[str, str]] = []
    index = settings.get("index-url")
    if index is None:
        rules.extend(_index_rules("https://pypi.org/simple", "default index (none configured)"))
    else:
        rules.extend(_index_rules(index[0], index[1]))
    for key in ("extra-index-url", "find-links"):
        if key in settings:
            value, where = settings[key]
            for url in value.split():
                rules.extend(_index_rules(url, where))
    if "trusted-host" in settings:
        value, where = settings["trusted-host"]
        for host in value.split():
            rules.append((_checked(host, where, "python-packages"), where))
    return rules


def _pip_settings(
    environ: Mapping[str, str], home: Path, project_dir: Path | None, system_root: Path
) -> dict[str, tuple[str, str]]:
    """pip's effective value of each key of ``_PIP_KEYS``: (value, where it was set).

    As pip does: files merge in order (a later file wins per section and key), then
    ``[install]`` wins over ``[global]``, then ``PIP_*`` variables win over files.
    """
    per_section: dict[tuple[str, str], tuple[str, str]] = {}
    for path in _pip_config_files(environ, home, project_dir, system_root):
        parser = configparser.RawConfigParser()
        try:
            parser.read_string(path.read_text(encoding="utf-8"), source=str(path))
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError, configparser.Error) as exc:
            raise ConfigError(
                f"preset 'python-packages' cannot read the pip configuration {path}: "
                f"{type(exc).__name__}: {_first_line(exc)}; fix the file or remove the preset"
            ) from exc
        for section in ("global", "install"):
            if not parser.has_section(section):
                continue
            for key, text in parser.items(section):
                normal = key.lower().replace("_", "-")
                if normal in _PIP_KEYS:
                    per_section[(section, normal)] = (text, f"{path} [{section}] {normal}")
    settings: dict[str, tuple[str, str]] = {}
    for wanted in ("global", "install"):
        for (section, key), setting in per_section.items():
            if section == wanted:
                settings[key] = setting
    for key in _PIP_KEYS:
        variable = "PIP_" + key.upper().replace("-", "_")
        if environ.get(variable, "").strip():
            settings[key] = (environ[variable], variable)
    return settings


def _pip_config_files(
    environ: Mapping[str, str], home: Path, project_dir: Path | None, system_root: Path
) -> list[Path]:
    """pip's configuration files on Linux, lowest precedence first."""
    named = environ.get("PIP_CONFIG_FILE", "")
    if named == "/dev/null":
        return []  # pip's documented way to load no configuration file at all
    dirs = environ.get("XDG_CONFIG_DIRS", "") or str(system_root / "etc" / "xdg")
    files = [Path(d) / "pip" / "pip.conf" for d in dirs.split(":") if Path(d).is_absolute()]
    files.append(system_root / "etc" / "pip.conf")
    files.append(home / ".pip" / "pip.conf")
    xdg_home = environ.get("XDG_CONFIG_HOME", "")
    base = Path(xdg_home) if xdg_home and Path(xdg_home).is_absolute() else home / ".config"
    files.append(base / "pip" / "pip.conf")
    if named:
        path = Path(named)
        if not path.is_absolute() and project_dir is not None:
            path = project_dir / path
        if path.is_absolute():
            files.append(path)
    return list(dict.fromkeys(files))


def _index_rules(url: str, where: str) -> list[tuple[str, str]]:
    entry = _url_rule(url, where, "python-packages")
    if entry is None:
        return []
    rules = [(entry, where)]
    host, _, port = entry.rpartition(":")
    files_host = _PYPI_FILES.get(host)
    if files_host is not None:
        rules.append((f"{files_host}:{port}", where))
    return rules


# ---------------------------------------------------------------------------------------------
# npm


def _npm_rules(
    environ: Mapping[str, str], home: Path, project_dir: Path | None
) -> list[tuple[str, str]]:
    user = _env_value(environ, "npm_config_userconfig") or str(home / ".npmrc")
    files = [Path(user) if Path(user).is_absolute() else home / user]
    if project_dir is not None:
        files.append(project_dir / ".npmrc")
    registry: tuple[str, str] | None = None
    scoped: list[tuple[str, str]] = []
    for path in dict.fromkeys(files):
        for key, value, line in _npmrc(path, environ):
            where = f"{path}:{line} {key}"
            if key == "registry":
                registry = (value, where)
            elif key.startswith("@") and key.endswith(":registry"):
                scoped.append((value, where))
    variable = _env_name(environ, "npm_config_registry")
    if variable is not None and environ[variable].strip():
        registry = (environ[variable].strip(), variable)
    rules: list[tuple[str, str]] = []
    if registry is None:
        rules.append((_NPM_DEFAULT, "default registry (none configured)"))
    else:
        entry = _url_rule(registry[0], registry[1], "npm")
        if entry is not None:
            rules.append((entry, registry[1]))
    for value, where in scoped:
        entry = _url_rule(value, where, "npm")
        if entry is not None:
            rules.append((entry, where))
    return rules


def _npmrc(path: Path, environ: Mapping[str, str]) -> list[tuple[str, str, int]]:
    """(key, value, line number) of the ``.npmrc`` at ``path``; nothing if it is missing."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"preset 'npm' cannot read {path}: {type(exc).__name__}: {_first_line(exc)}; "
            "fix the file or remove the preset"
        ) from exc
    items: list[tuple[str, str, int]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith((";", "#")):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        # Keys such as "//host/:_authToken" carry credentials: never looked at.
        if not sep or key.startswith("//"):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        value = _NPM_VAR_RE.sub(lambda m: environ.get(m.group(1), ""), value)
        items.append((key, value, number))
    return items


def _env_name(environ: Mapping[str, str], lower_name: str) -> str | None:
    # npm reads its variables case-insensitively; the lower-case spelling wins a tie.
    if lower_name in environ:
        return lower_name
    for name in environ:
        if name.lower() == lower_name:
            return name
    return None


def _env_value(environ: Mapping[str, str], lower_name: str) -> str:
    name = _env_name(environ, lower_name)
    return "" if name is None else environ[name].strip()


# ---------------------------------------------------------------------------------------------
# Shared


def _url_rule(url: str, where: str, preset: str) -> str | None:
    """The ``host:port`` rule of an index or registry URL; None for file:// and local paths."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ConfigError(
            f"preset {preset!r}: the URL in {where} is not valid ({exc}); fix it or remove "
            "the preset"
        ) from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        return None  # file://, a local directory: nothing to reach over the network
    host = parts.hostname
    if not host:
        raise ConfigError(
            f"preset {preset!r}: the URL in {where} has no host name; fix it or remove the preset"
        )
    shown = f"[{host}]" if ":" in host else host
    return _checked(f"{shown}:{port or _DEFAULT_PORTS[scheme]}", where, preset)


def _checked(entry: str, where: str, preset: str) -> str:
    try:
        return str(parse_rule(entry))
    except RuleError as exc:
        raise ConfigError(
            f"preset {preset!r}: the host in {where} is refused: {exc.reason}; fix it or "
            "remove the preset"
        ) from None


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else ""
