"""Policy: the frozen, hashed EffectivePolicy a sandbox is started with (DESIGN.md section 2)."""

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
