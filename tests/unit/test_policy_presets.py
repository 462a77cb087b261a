"""Presets: fixed host lists, and pip / npm configuration read from fake files in tmp dirs."""

from __future__ import annotations

from pathlib import Path

import pytest

from stockade._errors import ConfigError
from stockade.policy.presets import PRESETS, PresetHosts, preset_problem, resolve_presets
from stockade.policy.rules import parse_rule


class Host:
    """A fake host: home, system root, project and environment, all under tmp_path."""

    def __init__(self, tmp_path: Path) -> None:
        self.home = tmp_path / "home"
        self.root = tmp_path / "root"
        self.project = tmp_path / "project"
        for path in (self.home, self.root, self.project):
            path.mkdir()
        self.environ: dict[str, str] = {"HOME": str(self.home)}

    def write(self, path: Path, text: str) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def resolve(self, *names: str) -> PresetHosts:
        return resolve_presets(
            names,
            environ=self.environ,
            home=self.home,
            project_dir=self.project,
            system_root=self.root,
        )


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def test_every_preset_is_described_and_resolves_to_valid_rules(host: Host) -> None:
    for name, description in PRESETS.items():
        assert description
        found = host.resolve(name)
        assert found.allow
        for entry in (*found.allow, *found.tcp):
            assert str(parse_rule(entry)) == entry  # canonical, valid, not too broad
            assert found.sources[entry].startswith(f"preset {name}")
        for entry in found.tcp:
            assert parse_rule(entry, port_required=True).port is not None


def test_github(host: Host) -> None:
    found = host.resolve("github")
    assert found.allow == (
        "github.com:443",
        "api.github.com:443",
        "codeload.github.com:443",
        "objects.githubusercontent.com:443",
        "raw.githubusercontent.com:443",
    )
    assert found.tcp == ("github.com:22",)
    assert found.sources["github.com:22"] == "preset github"


@pytest.mark.parametrize(
    ("name", "entry"),
    [
        ("anthropic", "api.anthropic.com:443"),
        ("openai", "api.openai.com:443"),
        ("google-gemini", "generativelanguage.googleapis.com:443"),
        ("mistral", "api.mistral.ai:443"),
        ("groq", "api.groq.com:443"),
        ("openrouter", "openrouter.ai:443"),
    ],
)
def test_api_presets(host: Host, name: str, entry: str) -> None:
    assert host.resolve(name).allow == (entry,)


def test_presets_merge_in_order_without_duplicates(host: Host) -> None:
    found = host.resolve("openai", "github", "openai")
    assert found.allow[0] == "api.openai.com:443"
    assert found.allow.count("api.openai.com:443") == 1
    assert found.tcp == ("github.com:22",)
    assert host.resolve() == PresetHosts()


def test_unknown_preset_suggests_and_lists(host: Host) -> None:
    with pytest.raises(ConfigError) as info:
        host.resolve("gihub")
    message = str(info.value)
    assert "unknown network preset 'gihub'" in message
    assert "did you mean 'github'?" in message
    assert "python-packages, npm, github" in message
    assert preset_problem("github") is None
    assert "did you mean" not in (preset_problem("zzzzzz") or "")


# ---------------------------------------------------------------------------------------------
# python-packages


def test_pip_default_is_pypi(host: Host) -> None:
    found = host.resolve("python-packages")
    assert found.allow == ("pypi.org:443", "files.pythonhosted.org:443")
    assert "default" in found.sources["pypi.org:443"]


def test_pip_index_url_from_the_environment_replaces_pypi(host: Host) -> None:
    host.environ["PIP_INDEX_URL"] = "https://user:s3cret@mirror.corp.example/simple"
    host.environ["PIP_EXTRA_INDEX_URL"] = "http://extra.example:8080/simple https://x.example/"
    host.environ["PIP_TRUSTED_HOST"] = "extra.example:8080 other.example"
    found = host.resolve("python-packages")
    assert found.allow == (
        "mirror.corp.example:443",
        "extra.example:8080",
        "x.example:443",
        "other.example",
    )
    assert found.sources["mirror.corp.example:443"] == "preset python-packages: PIP_INDEX_URL"
    assert found.sources["x.example:443"] == "preset python-packages: PIP_EXTRA_INDEX_URL"
    assert "s3cret" not in repr(found)


def test_pip_config_files_in_pip_order(host: Host) -> None:
    system = host.write(
        host.root / "etc" / "pip.conf",
        "[global]\nindex-url = https://system.example/simple\ntrusted-host = sys.example\n",
    )
    host.write(
        host.home / ".pip" / "pip.conf", "[global]\nindex-url = https://legacy.example/simple\n"
    )
    user = host.write(
        host.home / ".config" / "pip" / "pip.conf",
        "[global]\nindex-url = https://user.example/simple\n",
    )
    found = host.resolve("python-packages")
    assert found.allow == ("user.example:443", "sys.example")
    assert found.sources["user.example:443"] == (
        f"preset python-packages: {user} [global] index-url"
    )
    assert found.sources["sys.example"] == f"preset python-packages: {system} [global] trusted-host"


def test_pip_install_section_wins_over_global_and_env_wins_over_files(host: Host) -> None:
    host.write(
        host.home / ".config" / "pip" / "pip.conf",
        "[install]\nindex_url = https://install.example/simple\n"
        "[global]\nindex-url = https://global.example/simple\n"
        "extra-index-url =\n    https://a.example/simple\n    https://b.example/simple\n",
    )
    found = host.resolve("python-packages")
    assert found.allow == ("install.example:443", "a.example:443", "b.example:443")
    host.environ["PIP_INDEX_URL"] = "https://env.example/simple"
    assert host.resolve("python-packages").allow[0] == "env.example:443"


def test_pip_xdg_and_pip_config_file(host: Host, tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    host.environ["XDG_CONFIG_HOME"] = str(xdg)
    host.write(xdg / "pip" / "pip.conf", "[global]\nindex-url = https://xdg.example/\n")
    assert host.resolve("python-packages").allow == ("xdg.example:443",)
    named = host.write(tmp_path / "named.conf", "[global]\nindex-url = https://named.example/\n")
    host.environ["PIP_CONFIG_FILE"] = str(named)
    assert host.resolve("python-packages").allow == ("named.example:443",)
    host.environ["PIP_CONFIG_FILE"] = "/dev/null"  # pip: read no file at all
    assert host.resolve("python-packages").allow == ("pypi.org:443", "files.pythonhosted.org:443")


def test_pip_xdg_config_dirs(host: Host, tmp_path: Path) -> None:
    host.write(
        host.root / "etc" / "xdg" / "pip" / "pip.conf", "[global]\nindex-url=https://a.example\n"
    )
    assert host.resolve("python-packages").allow == ("a.example:443",)
    other = tmp_path / "dirs"
    host.write(other / "pip" / "pip.conf", "[global]\nindex-url=https://b.example\n")
    host.environ["XDG_CONFIG_DIRS"] = f"{other}:relative/ignored"
    assert host.resolve("python-packages").allow == ("b.example:443",)


def test_pip_file_index_contributes_nothing(host: Host) -> None:
    host.environ["PIP_INDEX_URL"] = "file:///srv/wheels"
    host.environ["PIP_FIND_LINKS"] = "/srv/wheels https://links.example/wheels/"
    found = host.resolve("python-packages")
    assert found.allow == ("links.example:443",)  # and pypi.org is not added


def test_pip_explicit_pypi_brings_its_file_host(host: Host) -> None:
    host.environ["PIP_INDEX_URL"] = "https://test.pypi.org/simple"
    assert host.resolve("python-packages").allow == (
        "test.pypi.org:443",
        "test-files.pythonhosted.org:443",
    )


def test_pip_literal_address_index_becomes_an_address_rule(host: Host) -> None:
    host.environ["PIP_INDEX_URL"] = "http://[fd00::5]:3141/root/pypi/+simple/"
    host.environ["PIP_EXTRA_INDEX_URL"] = "http://10.0.0.5:8080/simple"
    assert host.resolve("python-packages").allow == ("[fd00::5]:3141", "10.0.0.5:8080")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("not an ini file", "cannot read the pip configuration"),
        ("[global]\nindex-url = a\nindex-url = b\n", "cannot read the pip configuration"),
        ("[global]\nindex-url = https://:99999/x\n", "is not valid"),
        ("[global]\nindex-url = https:///simple\n", "has no host name"),
        ("[global]\ntrusted-host = *.com\n", "too broad"),
    ],
)
def test_broken_pip_configuration_is_reported(host: Host, text: str, fragment: str) -> None:
    path = host.write(host.home / ".config" / "pip" / "pip.conf", text)
    with pytest.raises(ConfigError) as info:
        host.resolve("python-packages")
    assert fragment in str(info.value)
    assert "python-packages" in str(info.value)
    assert str(path) in str(info.value)


def test_broken_pip_configuration_does_not_echo_values(host: Host) -> None:
    host.write(
        host.home / ".config" / "pip" / "pip.conf",
        "garbage https://user:s3cret@mirror.example/simple\n",
    )
    with pytest.raises(ConfigError) as info:
        host.resolve("python-packages")
    assert "s3cret" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# npm


def test_npm_default(host: Host) -> None:
    found = host.resolve("npm")
    assert found.allow == ("registry.npmjs.org:443",)
    assert "default" in found.sources["registry.npmjs.org:443"]


def test_npm_user_and_project_npmrc(host: Host) -> None:
    user = host.write(
        host.home / ".npmrc",
        "; comment\n# comment\nregistry=https://user.example/npm/\n"
        '@corp:registry = "https://npm.corp.example/"\n'
        "//npm.corp.example/:_authToken=s3cret\n",
    )
    project = host.write(host.project / ".npmrc", "registry=https://project.example/\n")
    found = host.resolve("npm")
    assert found.allow == ("project.example:443", "npm.corp.example:443")
    assert found.sources["project.example:443"] == f"preset npm: {project}:1 registry"
    assert found.sources["npm.corp.example:443"] == f"preset npm: {user}:4 @corp:registry"
    assert "s3cret" not in repr(found)


@pytest.mark.parametrize("variable", ["npm_config_registry", "NPM_CONFIG_REGISTRY"])
def test_npm_registry_from_the_environment_wins(host: Host, variable: str) -> None:
    host.write(host.project / ".npmrc", "registry=https://project.example/\n")
    host.environ[variable] = "http://verdaccio.local:4873/"
    found = host.resolve("npm")
    assert found.allow == ("verdaccio.local:4873",)
    assert found.sources["verdaccio.local:4873"] == f"preset npm: {variable}"


def test_npm_userconfig_and_variable_expansion(host: Host, tmp_path: Path) -> None:
    rc = host.write(tmp_path / "custom-npmrc", "registry=https://${REG_HOST}/\n")
    host.environ["npm_config_userconfig"] = str(rc)
    host.environ["REG_HOST"] = "expanded.example"
    assert host.resolve("npm").allow == ("expanded.example:443",)


def test_npm_file_registry_contributes_nothing(host: Host) -> None:
    host.write(host.home / ".npmrc", "registry=file:///srv/npm\n")
    assert host.resolve("npm").allow == ()


def test_npm_unreadable_npmrc_is_reported(host: Host) -> None:
    (host.home / ".npmrc").mkdir()
    with pytest.raises(ConfigError, match="preset 'npm' cannot read"):
        host.resolve("npm")
