"""Network egress (DESIGN.md section 5): the policy core here; the proxy in its own modules.

Importing this package loads only the pure policy modules (rules, decide, presets); the
proxy, tunnel and TLS modules are imported where they are used.
"""

from stockade.egress.decide import (
    Decision,
    NetworkRules,
    compile_rules,
    decide,
    special_category,
    with_allowed,
    with_denied,
)
from stockade.egress.presets import PRESETS, PresetHosts, preset_problem, resolve_presets
from stockade.egress.rules import Rule, RuleError, parse_rule

__all__ = [
    "EGRESS_AVAILABLE",
    "PRESETS",
    "Decision",
    "NetworkRules",
    "PresetHosts",
    "Rule",
    "RuleError",
    "compile_rules",
    "decide",
    "parse_rule",
    "preset_problem",
    "resolve_presets",
    "special_category",
    "with_allowed",
    "with_denied",
]

#: Whether this build can carry traffic out of a sandbox. While False, a policy with any
#: ``[network] allow``, ``tcp`` or ``presets`` entry is refused (the network stays closed and
#: could not honour it); ``deny`` entries are accepted. The lead flips this once the tunnel
#: and proxy are wired into every backend.
EGRESS_AVAILABLE = True
