"""``stockade doctor``: every backend of the design, whether it runs here, why not, how to fix."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import click

__all__ = ["host_facts", "recover_interrupted_applies", "run_doctor"]


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
    from stockade.backends.registry import cgroup_support
    from stockade.workspace.disk import disk_support

    cg = cgroup_support()
    disk_ok, disk_how = disk_support()
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
        "disk_limit": {"enforced": disk_ok, "how": disk_how},
    }


def measure_start(
    backend: str, runs: int = 3, config: dict[str, Any] | None = None
) -> float | None:
    """Median ms of create + `true` + destroy on ``backend`` (no workspace), or None."""
    import statistics
    import tempfile
    import time

    import anyio

    from stockade.backends.registry import get_backend_class
    from stockade.config import load_config
    from stockade.policy import compile_policy
    from stockade.sandbox import AsyncSandbox

    # Whatever backend is asked for is measured (unsafe_host matters to the host one alone).
    overrides: dict[str, Any] = {
        "backend": backend,
        "workspace.mode": "none",
        "unsafe_host": True,
        **(config or {}),
    }
    with tempfile.TemporaryDirectory(prefix="stockade-doctor-") as tmp:
        policy = compile_policy(load_config(Path(tmp), overrides=overrides))

        async def once() -> float:
            t = time.perf_counter()
            sandbox = await AsyncSandbox.start(
                policy,
                backend=get_backend_class(backend)(),
                state_dir=Path(tmp) / "state",
                actor="doctor",
            )
            try:
                await sandbox.commands.run(["true"])
            finally:
                await sandbox.aclose()
            return time.perf_counter() - t

        async def measure() -> float:
            samples = [await once() for _ in range(runs)]
            return statistics.median(samples) * 1000

        try:
            return anyio.run(measure)
        except Exception:
            return None


def _variant_rows(backend: str, measure: bool) -> list[dict[str, Any]]:
    """One row per engine of a backend with variants (the container backend's engines)."""
    from stockade.backends.registry import probe, variants

    rows = []
    for variant in variants(backend):
        availability = probe(f"{backend}/{variant}")
        latency = None
        if measure and availability.ok:
            latency = measure_start(backend, config={f"{backend}.engine": variant})
        rows.append(
            {
                "name": variant,
                "available": availability.ok,
                "reason": availability.reason,
                "fix": availability.fix,
                "details": list(availability.details),
                "start_ms": latency,
            }
        )
    return rows


def leftovers_report(fix: bool) -> dict[str, Any]:
    """Leftovers of sandboxes in the state directory (see stockade.cli.orphans); with
    ``fix``, remove the removable ones. Never raises: a doctor must run on a broken host."""
    from stockade import StockadeError
    from stockade.cli.orphans import find_orphans, remove_orphan
    from stockade.state import StateStore

    try:
        store = StateStore()
        found = find_orphans(store)
    except (StockadeError, OSError) as exc:
        return {"error": str(exc), "leftovers": []}
    rows = []
    for orphan in found:
        row: dict[str, Any] = {**orphan.to_dict(), "removed": False, "error": None}
        if fix and orphan.removable:
            try:
                remove_orphan(store, orphan)
            except (StockadeError, OSError, subprocess.CalledProcessError) as exc:
                row["error"] = str(exc)
            else:
                row["removed"] = True
        rows.append(row)
    return {"state_dir": str(store.root), "read_only": store.read_only, "leftovers": rows}


def _print_leftovers(console: Any, report: dict[str, Any]) -> None:
    from rich.markup import escape

    if report.get("error"):
        console.print(f"[red]state directory: {escape(report['error'])}[/]")
        return
    if report["read_only"]:
        console.print(
            f"[red]state directory {escape(report['state_dir'])}: the disk is full; free space "
            "(`stockade rm NAME` of sandboxes you no longer need)[/]"
        )
    rows = report["leftovers"]
    if not rows:
        console.print("leftovers of sandboxes: none")
        return
    console.print("leftovers of sandboxes:")
    for row in rows:
        if row["removed"]:
            state = "[green]removed[/]"
        elif row["error"]:
            state = f"[red]not removed: {escape(row['error'])}[/]"
        elif not row["removable"]:
            state = f"[yellow]kept: {escape(row['why_not'])}[/]"
        else:
            state = "[yellow]remove with `stockade doctor --fix`[/]"
        console.print(f"  {escape(row['what'])}: {state}")


def recover_interrupted_applies() -> list[dict[str, str]]:
    """Finish or roll back every apply a crash interrupted, for each sandbox with a
    workspace: one row (sandbox, what was done, or the error) per sandbox that had one."""
    from stockade import WorkspaceError
    from stockade.state import StateStore
    from stockade.workspace.txn import JOURNAL_DIR_NAME, recover

    rows: list[dict[str, str]] = []
    for record in StateStore().list():
        if not record.workspace or not record.dir:
            continue
        try:
            done = recover(Path(record.workspace), Path(record.dir) / JOURNAL_DIR_NAME)
        except WorkspaceError as exc:
            rows.append({"sandbox": record.name, "error": str(exc)})
            continue
        if done is not None:
            rows.append({"sandbox": record.name, "recovered": done})
    return rows


def run_doctor(as_json: bool, measure: bool = True, *, fix: bool = False) -> None:
    from stockade.backends.registry import get_backend_class, probe_all, variants

    rows: list[dict[str, Any]] = []
    chosen = None
    for entry, availability in probe_all(fresh=True):  # a diagnosis never trusts the cache
        caps = get_backend_class(entry.name).capabilities
        if chosen is None and entry.auto and availability.ok and availability.auto:
            chosen = entry.name
        latency = None
        engines: list[dict[str, Any]] = []
        if variants(entry.name):
            engines = _variant_rows(entry.name, measure)
            timed = [e["start_ms"] for e in engines if e["start_ms"] is not None]
            latency = timed[0] if timed else None
        elif measure and availability.ok and entry.auto:
            latency = measure_start(entry.name)
        rows.append(
            {
                "backend": entry.name,
                "tier": entry.tier,
                "mechanism": entry.mechanism,
                "available": availability.ok,
                "reason": availability.reason,
                "fix": availability.fix,
                "auto": entry.auto and availability.auto,
                "start_ms": latency,
                "engines": engines,
                "details": list(availability.details),
                "enforces": list(caps.enforces),
                "does_not_enforce": list(caps.does_not_enforce),
            }
        )
    facts = host_facts()
    leftovers = leftovers_report(fix)
    applies = recover_interrupted_applies()
    if as_json:
        report = {"auto": chosen, "backends": rows, "host": facts, "state": leftovers}
        click.echo(json.dumps({**report, "interrupted_applies": applies}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(
        "TIER", "BACKEND", "AVAILABLE", "START", "WHY / HOW TO ENABLE", title="stockade doctor"
    )
    for row in rows:
        ok = "[green]yes[/]" if row["available"] else "[red]no[/]"
        note = row["reason"]
        if not row["available"] and row["fix"]:
            note += f"\n[dim]fix: {row['fix']}[/]"
        if not row["auto"] and row["available"]:
            note += f"\n[yellow]not chosen by auto; ask for it: --backend {row['backend']}[/]"
        start = f"{row['start_ms']:.0f} ms" if row["start_ms"] is not None else "-"
        table.add_row(str(row["tier"]), row["backend"], ok, start, note)
        for engine in row["engines"]:
            ok = "[green]yes[/]" if engine["available"] else "[red]no[/]"
            note = engine["reason"] + (
                f"\n[dim]fix: {engine['fix']}[/]"
                if not engine["available"] and engine["fix"]
                else ""
            )
            note += "".join(f"\n[dim]{detail}[/]" for detail in engine["details"])
            start = f"{engine['start_ms']:.0f} ms" if engine["start_ms"] is not None else "-"
            table.add_row("", f"  {row['backend']}/{engine['name']}", ok, start, note)
        for detail in row["details"] if not row["engines"] else []:
            table.add_row("", "", "", "", f"[dim]{detail}[/]")
    console.print(table)
    console.print(f"auto selects: [bold]{chosen or 'nothing (see above)'}[/]")
    console.print(
        "[dim]START: median of create + `true` + destroy, measured now on this machine[/]"
    )
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
    disk = facts["disk_limit"]
    console.print(
        ("" if disk["enforced"] else "[yellow]") + disk["how"] + ("" if disk["enforced"] else "[/]")
    )
    _print_leftovers(console, leftovers)
    _print_applies(console, applies)
    for row in rows:
        if row["enforces"]:
            console.print(f"\n[bold]{row['backend']}[/] enforces:")
            for item in row["enforces"]:
                console.print(f"  + {item}")
            for item in row["does_not_enforce"]:
                console.print(f"  - does not: {item}")


def _print_applies(console: Any, applies: list[dict[str, str]]) -> None:
    from rich.markup import escape

    for row in applies:
        if "error" in row:
            console.print(f"[red]sandbox {escape(row['sandbox'])}:[/] {escape(row['error'])}")
        else:
            console.print(f"sandbox {escape(row['sandbox'])}: {escape(row['recovered'])}")
