"""``stockade doctor``: every backend of the design, whether it runs here, why not, how to fix."""

from __future__ import annotations

import ctypes
import json
import os
import platform
from typing import Any

import click

__all__ = ["host_facts", "run_doctor"]


def _landlock_abi() -> int:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
        abi = int(libc.syscall(444, None, 0, 1))
    except (OSError, AttributeError):
        return 0
    return max(abi, 0)


def host_facts() -> dict[str, Any]:
    """Facts about this machine that decide what the backends can enforce."""
    from stockade.backends._cgroups import probe_cgroups

    cg = probe_cgroups()
    return {
        "kernel": platform.release(),
        "arch": platform.machine(),
        "user": os.getuid(),
        "landlock_abi": _landlock_abi(),
        "kvm": os.path.exists("/dev/kvm"),
        "cgroups": {
            "available": cg.available,
            "version": cg.version,
            "controllers": sorted(cg.controllers),
            "reason": cg.reason,
            "fix": cg.fix,
        },
    }


def run_doctor(as_json: bool) -> None:
    from stockade.backends.registry import get_backend_class, probe_all

    rows: list[dict[str, Any]] = []
    chosen = None
    for entry, availability in probe_all():
        caps = None
        if entry.built:
            caps = get_backend_class(entry.name).capabilities
        if chosen is None and entry.auto and availability.ok:
            chosen = entry.name
        rows.append(
            {
                "backend": entry.name,
                "tier": entry.tier,
                "mechanism": entry.mechanism,
                "available": availability.ok,
                "reason": availability.reason,
                "fix": availability.fix,
                "auto": entry.auto,
                "enforces": list(caps.enforces) if caps else [],
                "does_not_enforce": list(caps.does_not_enforce) if caps else [],
            }
        )
    facts = host_facts()
    if as_json:
        click.echo(json.dumps({"auto": chosen, "backends": rows, "host": facts}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table("TIER", "BACKEND", "AVAILABLE", "WHY / HOW TO ENABLE", title="stockade doctor")
    for row in rows:
        ok = "[green]yes[/]" if row["available"] else "[red]no[/]"
        note = row["reason"]
        if not row["available"] and row["fix"]:
            note += f"\n[dim]fix: {row['fix']}[/]"
        if not row["auto"]:
            note += "\n[yellow]never chosen by auto; needs --unsafe-host[/]"
        table.add_row(str(row["tier"]), row["backend"], ok, note)
    console.print(table)
    console.print(f"auto selects: [bold]{chosen or 'nothing (see above)'}[/]")
    cg = facts["cgroups"]
    console.print(
        f"host: kernel {facts['kernel']} ({facts['arch']}), uid {facts['user']}, "
        f"Landlock ABI {facts['landlock_abi'] or 'none'}, cgroups "
        + (
            f"{cg['version']} ({', '.join(cg['controllers'])})"
            if cg["available"]
            else f"unavailable: {cg['reason']}"
        )
    )
    for row in rows:
        if row["enforces"]:
            console.print(f"\n[bold]{row['backend']}[/] enforces:")
            for item in row["enforces"]:
                console.print(f"  + {item}")
            for item in row["does_not_enforce"]:
                console.print(f"  - does not: {item}")
