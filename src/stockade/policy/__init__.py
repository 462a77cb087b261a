"""Policy: the frozen, hashed EffectivePolicy a sandbox is started with (DESIGN.md section 2).

Two layers live here. The network vocabulary (``rules``, ``decide``, ``presets``,
``secret_config``) is pure and imported by the configuration; ``compile`` builds on the
configuration. So that importing the vocabulary does not load ``compile`` (and through it
``config``, which imports the vocabulary), the names below load on first use.
"""

TYPE_CHECKING = False
if TYPE_CHECKING:
    from stockade.policy.compile import (
        BASE_ENV,
        PROTECTED_PATHS,
        EffectivePolicy,
        LimitsPolicy,
        NetworkPolicy,
        WorkspacePolicy,
        compile_policy,
        is_protected,
    )

__all__ = [
    "BASE_ENV",
    "PROTECTED_PATHS",
    "EffectivePolicy",
    "LimitsPolicy",
    "NetworkPolicy",
    "WorkspacePolicy",
    "compile_policy",
    "is_protected",
]


def __getattr__(name: str) -> object:
    if name not in __all__:
        raise AttributeError(f"module 'stockade.policy' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module("stockade.policy.compile"), name)
    globals()[name] = value
    return value
