"""Configuration: the ``stockade.toml`` schema and its layered loading (DESIGN.md section 8)."""

from stockade.config.load import (
    RUNTIME_ENV_PREFIXES,
    RUNTIME_ENV_VARS,
    LoadedConfig,
    find_project_root,
    load_config,
    project_file_weakenings,
    trust_store,
    user_config_path,
)
from stockade.config.models import (
    CONFIG_KEYS,
    ENV_VAR_KEYS,
    ConfigKey,
    EnvConfig,
    LimitsConfig,
    NetworkConfig,
    ProfileConfig,
    StockadeConfig,
    WorkspaceConfig,
)
from stockade.config.safety import check_safety, credential_reason
from stockade.config.trust import TrustRecord, TrustStore, UntrustedConfigError, Weakening
from stockade.config.units import format_duration, format_size, parse_duration, parse_size

__all__ = [
    "CONFIG_KEYS",
    "ENV_VAR_KEYS",
    "RUNTIME_ENV_PREFIXES",
    "RUNTIME_ENV_VARS",
    "ConfigKey",
    "EnvConfig",
    "LimitsConfig",
    "LoadedConfig",
    "NetworkConfig",
    "ProfileConfig",
    "StockadeConfig",
    "TrustRecord",
    "TrustStore",
    "UntrustedConfigError",
    "Weakening",
    "WorkspaceConfig",
    "check_safety",
    "credential_reason",
    "find_project_root",
    "format_duration",
    "format_size",
    "load_config",
    "parse_duration",
    "parse_size",
    "project_file_weakenings",
    "trust_store",
    "user_config_path",
]
