"""Network egress (DESIGN.md section 5): the per-sandbox proxy, its tunnels, TLS and secrets.

The policy it enforces (rules, ``decide``, presets, secret configuration) is vocabulary of
``stockade.policy``; nothing here is imported by the configuration.
"""
