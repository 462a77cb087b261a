"""The ``stockade`` command line.

Heavy modules (rich, the workspace diff, backends) are imported inside the commands that
need them, so ``stockade run --rm -- true`` stays fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import click

from stockade import SandboxNotFoundError, SandboxStateError, StockadeError
from stockade.cli.running import connect_running, running_record
from stockade.workspace.display import display_path

F = TypeVar("F", bound=Callable[..., Any])

_EXEC_SETTINGS = {"ignore_unknown_options": True, "allow_interspersed_args": False}


def _policy_options(fn: F) -> F:
    options = [
        click.option("--backend", help="Isolation backend: auto, namespace, host, ..."),
        click.option("--profile", help="Configuration profile to apply."),
        click.option(
            "--workspace-mode",
            type=click.Choice(["cow", "ro", "rw", "none"]),
            help="How the sandbox sees the project (default cow: copy-on-write).",
        ),
        click.option("-C", "--project", "project", help="Project directory (default: here)."),
        click.option("--memory", help="Memory limit, e.g. 512M, 2GiB."),
        click.option("--pids", type=int, help="Most processes at once."),
        click.option("--cpus", type=float, help="CPU limit (cores)."),
        click.option("--disk", help="Most bytes written (workspace, /tmp, home), e.g. 10GiB."),
        click.option("--timeout", "sandbox_timeout", help="Wall-clock limit for the sandbox."),
        click.option("--command-timeout", help="Wall-clock limit per command."),
        click.option(
            "-e", "--env", "env", multiple=True, help="NAME=VALUE to set inside (repeatable)."
        ),
        click.option(
            "--unsafe-host",
            is_flag=True,
            default=None,
            help="Allow the 'host' backend: NO isolation at all.",
        ),
        click.option(
            "--allow-dangerous-mount",
            "allow_dangerous_mounts",
            multiple=True,
            # config.models.DANGEROUS_MOUNTS, spelled out: no pydantic import at start-up.
            type=click.Choice(["credentials", "executables", "sockets"]),
            help="Share a directory that holds credentials, host programs (rw) or sockets "
            "anyway (repeatable).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _env_map(pairs: Sequence[str]) -> dict[str, str]:
    """``-e NAME=VALUE`` options as a mapping; a usage error names a malformed one."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(
                f"{pair!r} is not NAME=VALUE (e.g. -e DEBUG=1)", param_hint="'-e' / '--env'"
            )
        env[key] = value
    return env


def _compile(opts: dict[str, Any]) -> Any:
    """Load config with CLI flags as the flag layer and compile the policy."""
    from stockade.config import load_config
    from stockade.policy import compile_policy

    flags: dict[str, Any] = {}
    for key, opt in (
        ("backend", "backend"),
        ("workspace.mode", "workspace_mode"),
        ("limits.memory", "memory"),
        ("limits.pids", "pids"),
        ("limits.cpus", "cpus"),
        ("limits.disk", "disk"),
        ("limits.timeout", "sandbox_timeout"),
        ("limits.command_timeout", "command_timeout"),
        ("unsafe_host", "unsafe_host"),
    ):
        if opts.get(opt) is not None:
            flags[key] = opts[opt]
    if opts.get("env"):
        flags["env.set"] = _env_map(opts["env"])
    if opts.get("allow_dangerous_mounts"):
        flags["allow_dangerous_mounts"] = list(opts["allow_dangerous_mounts"])
    project = Path(opts["project"]) if opts.get("project") else None
    from stockade import ConfigError
    from stockade.config import UntrustedConfigError

    try:
        loaded = load_config(project, profile=opts.get("profile"), flags=flags)
    except UntrustedConfigError as exc:
        raise ConfigError(exc.cli_message()) from None  # the fixes as options, not arguments
    return compile_policy(loaded)


def _warn_host(policy: Any) -> None:
    from stockade.backends.registry import start_warning

    if warning := start_warning(policy.backend):
        click.secho(warning, fg="red", bold=True, err=True)


def _store() -> Any:
    from stockade.state import StateStore

    return StateStore()


def _resolve(store: Any, name: str | None) -> Any:
    """The named sandbox, or the newest one whose workspace contains the current directory."""
    if name:
        return store.reconcile(store.get(name))
    here = Path.cwd().resolve()
    candidates = [
        r
        for r in store.list()
        if r.workspace and (here == Path(r.workspace) or Path(r.workspace) in here.parents)
    ]
    if not candidates:
        raise SandboxNotFoundError(
            f"no sandbox uses {here} as its workspace; pass a NAME (see `stockade ls`)"
        )
    newest = max(candidates, key=lambda r: r.created_at)
    return store.reconcile(newest)


def _progress(message: str) -> Any:
    """A spinner on stderr while something slow runs (only on a terminal)."""
    import contextlib

    if not sys.stderr.isatty():
        return contextlib.nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(message)


def _fail(exc: BaseException) -> None:
    click.secho(f"stockade: {exc}", fg="red", err=True)
    raise SystemExit(125)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StockadeError as exc:
            _fail(exc)
        except KeyboardInterrupt:
            raise SystemExit(130) from None


@click.group(cls=_Group)
@click.version_option(package_name="stockade")
def cli() -> None:
    """Run AI agents and commands in the strongest sandbox this machine runs fast."""


# --- running ----------------------------------------------------------------------------


@cli.command(context_settings=_EXEC_SETTINGS)
@_policy_options
@click.option("--name", help="Name for the sandbox (default: generated).")
@click.option("--rm", "remove", is_flag=True, help="Remove the sandbox when the command ends.")
@click.option("--tty/--no-tty", "-t", default=None, help="Attach a terminal (default: if one).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(
    command: tuple[str, ...], name: str | None, remove: bool, tty: bool | None, **opts: Any
) -> None:
    """Run COMMAND in a new sandbox; keep it for `diff`/`apply` unless --rm."""
    import anyio

    policy = _compile(opts)
    _warn_host(policy)
    code = anyio.run(_run_async, policy, list(command), name, remove, tty)
    raise SystemExit(code)


async def _run_async(
    policy: Any, command: list[str], name: str | None, remove: bool, tty: bool | None
) -> int:
    import anyio

    from stockade import AsyncSandbox
    from stockade.cli.attach import attach_local

    sandbox: AsyncSandbox | None = None
    code = 0
    signalled: list[int] = []
    failure: Exception | None = None
    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as body:
            tg.start_soon(_absorb_signals, body, signalled)
            try:
                sandbox = await AsyncSandbox.start(policy, name=name, keep=not remove, actor="cli")
                code = await attach_local(sandbox, command, tty)
            except Exception as exc:  # raised again below, outside the task group
                failure = exc
            finally:
                if sandbox is not None:
                    if remove:
                        await _report_discarded(sandbox)
                    await sandbox.aclose()  # shielded: the workspace is saved, even on a signal
        tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if sandbox is not None and not remove:
        lost = _lost_note(sandbox.name, sandbox.state_dir, running=False)
        if lost:
            click.secho(f"stockade: {lost}", fg="yellow", err=True)
            click.echo(f"review what was saved: stockade diff {sandbox.name}", err=True)
        else:
            await _print_run_summary(sandbox)
    return 128 + signalled[0] if signalled else code


async def _absorb_signals(body: Any, signalled: list[int]) -> None:
    """SIGTERM, SIGINT, SIGHUP end `run`'s command (``body`` is cancelled) and then wait for
    the sandbox's orderly close, which saves its workspace: later signals do not cut it."""
    import signal

    import anyio

    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if not signalled:
                signalled.append(int(signum))
                body.cancel()


def _lost_note(name: str, directory: str | Path | None, *, running: bool) -> str | None:
    """What to say when the sandbox's workspace changes could not be saved (else None)."""
    from stockade.workspace.save import lost_message, lost_save

    save = lost_save(directory, running=running) if directory else None
    return lost_message(name, save) if save is not None else None


async def _report_discarded(sandbox: Any) -> None:
    """Say what `run --rm` throws away with the sandbox: nothing is discarded silently."""
    import anyio

    if sandbox.policy.workspace.mode != "cow":
        return
    with anyio.CancelScope(shield=True):
        try:
            changes = _shown_changes(await sandbox.workspace.diff())
        except (StockadeError, OSError) as exc:
            click.echo(
                f"stockade: sandbox {sandbox.name}: could not list the workspace changes "
                f"discarded with it (--rm): {exc}",
                err=True,
            )
            return
    if not changes:
        click.echo(f"stockade: sandbox {sandbox.name}: no changes discarded (--rm)", err=True)
        return
    count = f"{len(changes)} changed file" + ("" if len(changes) == 1 else "s")
    click.echo(
        f"stockade: discarded {count} of sandbox {sandbox.name}: {_first(changes, 10)} (--rm)",
        err=True,
    )


def _shown_changes(diff: Any) -> list[str]:
    """The changed paths of a workspace diff, safe to print: a directory ends in '/', and
    an added directory stands for everything in it."""
    shown: list[str] = []
    added_dirs: list[str] = []
    for change in sorted(diff, key=lambda c: c.path):
        if any(change.path.startswith(d) for d in added_dirs):
            continue
        is_dir = getattr(change, "type", None) == "dir"
        if is_dir and change.kind == "added":
            added_dirs.append(change.path + "/")
        shown.append(display_path(change.path) + ("/" if is_dir else ""))
    return shown


def _first(items: list[str], limit: int) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


async def _print_run_summary(sandbox: Any) -> None:
    try:
        diff = await sandbox.workspace.diff()
    except SandboxStateError:  # it has no copy-on-write workspace
        click.echo(
            f"stockade: sandbox {sandbox.name} kept (no workspace changes tracked)", err=True
        )
        return
    if not diff:
        click.echo(f"stockade: sandbox {sandbox.name}: no changes to the workspace", err=True)
        return
    click.echo(f"stockade: sandbox {sandbox.name} changed {diff.summary()}:", err=True)
    for change in list(diff)[:20]:
        mark = {"added": "A", "modified": "M", "deleted": "D"}[change.kind]
        click.echo(
            f"  {mark} {change.path}" + ("  (protected)" if change.protected else ""), err=True
        )
    if len(diff) > 20:
        click.echo(f"  ... and {len(diff) - 20} more", err=True)
    click.echo(
        f"review: stockade diff {sandbox.name} | apply: stockade apply {sandbox.name} | "
        f"discard: stockade reset {sandbox.name}",
        err=True,
    )


@cli.command()
@_policy_options
@click.option("--name", help="Name for the sandbox (default: generated).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def create(name: str | None, as_json: bool, **opts: Any) -> None:
    """Create a sandbox that keeps running (a supervisor process holds it)."""
    policy = _compile(opts)
    _warn_host(policy)
    from stockade.cli.supervise import spawn_supervisor

    with _progress("starting sandbox"):
        result = spawn_supervisor(policy, name)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(result["name"])


@cli.command("exec", context_settings=_EXEC_SETTINGS)
@click.argument("name")
@click.option("--tty/--no-tty", "-t", default=None, help="Attach a terminal (default: if one).")
@click.option("--timeout", type=float, help="Kill the command after this many seconds.")
@click.option("-e", "--env", "env", multiple=True, help="NAME=VALUE (repeatable).")
@click.option("-w", "--workdir", help="Working directory inside the sandbox.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(
    name: str,
    tty: bool | None,
    timeout: float | None,
    env: tuple[str, ...],
    workdir: str | None,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND in the running sandbox NAME; its exit code is passed through."""
    import anyio

    from stockade.cli.attach import attach_remote

    env_map = _env_map(env)
    record = running_record(name)
    if command and command[0] == "--":  # `exec NAME -- CMD`: click keeps a "--" after NAME
        command = command[1:]
    if not command:
        raise click.UsageError("give the command to run after NAME, e.g. `exec NAME -- ls`")
    code = anyio.run(
        lambda: attach_remote(record.name, list(command), tty, env_map, workdir, timeout)
    )
    raise SystemExit(code)


@cli.command()
@click.argument("name")
def shell(name: str) -> None:
    """Open an interactive shell in the running sandbox NAME."""
    import anyio

    from stockade.cli.attach import attach_remote

    record = running_record(name)
    code = anyio.run(lambda: attach_remote(record.name, None, True, {}, None, None))
    raise SystemExit(code)


# --- lifecycle --------------------------------------------------------------------------


@cli.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--all",
    "all_",
    is_flag=True,
    help="Also list leftovers: sandbox directories without a record, records without a "
    "directory, mounts and containers of no sandbox (`stockade doctor --fix` removes them).",
)
def ls(as_json: bool, all_: bool) -> None:
    """List sandboxes and their status."""
    store = _store()
    records = [store.reconcile(r) for r in store.list()]
    leftovers = _orphans(store, containers=all_)
    if as_json:
        rows: list[dict[str, Any]] = [
            {
                "name": r.name,
                "id": r.id,
                "status": str(r.status),
                "backend": r.backend,
                "workspace": r.workspace,
                "created_at": r.created_at,
                "error": r.error,
            }
            for r in records
        ]
        if all_:
            rows += [{"status": "orphan", **o.to_dict()} for o in leftovers]
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("NAME", "STATUS", "BACKEND", "WORKSPACE", "CREATED", box=None)
    import datetime as dt

    for r in sorted(records, key=lambda r: r.created_at):
        status = str(r.status)
        style = {"running": "green", "failed": "red"}.get(status, "")
        table.add_row(
            r.name,
            f"[{style}]{status}[/]" if style else status,
            r.backend,
            r.workspace or "-",
            dt.datetime.fromtimestamp(r.created_at).strftime("%Y-%m-%d %H:%M:%S"),
        )
    Console().print(table)
    for r in records:
        lost = _lost_note(r.name, r.dir, running=r.status == "running")
        if lost:
            click.secho(lost, fg="yellow")
    if store.read_only:
        click.secho(
            f"stockade: the disk of {store.root} is full: read-only until space is freed "
            "(`stockade rm NAME` frees a sandbox's space)",
            fg="yellow",
            err=True,
        )
    if leftovers and not all_:
        click.echo(
            f"{len(leftovers)} leftover{'s' if len(leftovers) != 1 else ''} of removed or "
            "failed sandboxes: `stockade ls --all` lists them, `stockade doctor --fix` removes "
            "them"
        )
    elif leftovers:
        click.echo("leftovers of sandboxes (`stockade doctor --fix` removes them):")
        for leftover in leftovers:
            click.echo(f"  {display_path(leftover.what)}")
            if not leftover.removable:
                click.echo(f"    kept by --fix: {display_path(leftover.why_not)}")


@cli.command()
@click.argument("names", nargs=-1, required=True)
def stop(names: tuple[str, ...]) -> None:
    """Stop running sandboxes (their workspace changes are kept)."""
    from stockade.cli.supervise import stop_sandbox

    store = _store()
    for name in names:
        stop_sandbox(store, store.reconcile(store.get(name)))
        click.echo(name)


@cli.command()
@click.argument("names", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Remove every sandbox (and leftovers).")
@click.option(
    "--force",
    "-f",
    is_flag=True,
    help="Remove sandboxes with unapplied workspace changes without asking.",
)
def rm(names: tuple[str, ...], all_: bool, force: bool) -> None:
    """Stop and remove sandboxes: processes, workspace layer and record.

    A sandbox whose workspace has changes not applied yet is removed only after a yes on
    the terminal, or with --force.
    """
    from stockade.cli.orphans import reap_backend, remove_orphan
    from stockade.cli.supervise import remove_sandbox

    store = _store()
    if not names and not all_:
        raise click.UsageError("name a sandbox to remove, or pass --all")
    records = store.list() if all_ else [store.get(name) for name in dict.fromkeys(names)]
    if not force:
        records = _confirm_discard(records, all_)
    for record in records:
        remove_sandbox(store, record)
        reap_backend(record.backend, record.id)
        click.echo(record.name)
    if all_:
        for leftover in _orphans(store, containers=True):
            if leftover.removable:
                remove_orphan(store, leftover)
                click.echo(f"{display_path(leftover.what)}: removed")
            else:
                click.echo(
                    f"{display_path(leftover.what)}: kept: {display_path(leftover.why_not)}",
                    err=True,
                )


def _confirm_discard(records: list[Any], all_: bool) -> list[Any]:
    """The sandboxes the user agrees to remove: any with unapplied workspace changes needs
    a yes on a terminal; without one, nothing is removed and the error says what to do."""
    agreed: list[Any] = []
    refused: list[str] = []
    tty = sys.stdin.isatty()
    for record in records:
        name = record.name
        try:
            changes = _unapplied(record)
        except (StockadeError, OSError) as exc:
            problem = f"cannot tell whether sandbox {name} has unapplied changes ({exc})"
        else:
            if not changes:
                agreed.append(record)
                continue
            count = f"{len(changes)} unapplied change" + ("" if len(changes) == 1 else "s")
            problem = f"sandbox {name} has {count} ({_first(changes, 3)})"
        if tty:
            if click.confirm(f"{problem}; remove it and discard them?", default=False, err=True):
                agreed.append(record)
            else:
                click.echo(f"kept {name}", err=True)
            continue
        again = "--all" if all_ else name
        refused.append(
            f"{problem}; review them with `stockade diff {name}`, apply with `stockade apply "
            f"{name}`, or remove anyway with `stockade rm --force {again}`"
        )
    if refused:
        raise SandboxStateError("nothing removed: " + "\n".join(refused))
    return agreed


def _unapplied(record: Any) -> list[str]:
    """The workspace changes of a sandbox not applied to the project yet, safe to print."""
    if not record.workspace or not record.dir or not (Path(record.dir) / "upper").is_dir():
        return []
    from stockade.workspace import compute_diff

    _sync_running(record)
    return _shown_changes(compute_diff(_layers(record), protected=_protected(record)))


def _orphans(store: Any, *, containers: bool) -> list[Any]:
    """Leftovers of sandboxes (see stockade.cli.orphans): directories without a record,
    records without a directory, mounts; with ``containers``, engine containers too."""
    from stockade.cli.orphans import find_orphans

    found: list[Any] = find_orphans(store, containers=containers)
    return found


# --- workspace --------------------------------------------------------------------------


def _layers(record: Any) -> Any:
    from stockade.workspace import WorkspaceLayers

    layers = WorkspaceLayers.at(record.dir, record.workspace) if record.workspace else None
    if layers is None or not layers.upper.is_dir():
        raise SandboxStateError(
            f"sandbox {record.name!r} has no copy-on-write workspace to diff or apply"
        )
    return layers


def _sync_running(record: Any) -> None:
    """A running sandbox may keep its writes inside it (a microVM's guest): bring them to
    the host layers first."""
    if record.status == "running" and record.control_socket:
        with connect_running(record.name) as sandbox:
            sandbox.workspace.sync()


def _protected(record: Any) -> tuple[str, ...]:
    from stockade.policy import EffectivePolicy

    return tuple(EffectivePolicy.from_json(record.policy_json).workspace.protected)


@cli.command()
@click.argument("name", required=False)
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with patches).")
@click.option("--stat", is_flag=True, help="Only list the changed files.")
@click.option(
    "--include-ignored", is_flag=True, help="Also show paths that .gitignore rules leave out."
)
def diff(
    name: str | None, paths: tuple[str, ...], as_json: bool, stat: bool, include_ignored: bool
) -> None:
    """Show what the sandbox changed in the workspace (default: newest sandbox here).

    Prints a patch `git apply` accepts on stdout (the summary goes to stderr), limited to
    PATHs when given (relative to the current directory inside the project).
    """
    from stockade import Sandbox

    record = _resolve(_store(), name)
    layers = _layers(record)
    selected = [_project_path(layers.lower, p) for p in paths] if paths else None
    with Sandbox.connect(record.id, actor="cli") as sandbox:  # closing detaches
        result = sandbox.workspace.diff(selected, include_ignored=include_ignored)
    lost = _lost_note(record.name, record.dir, running=record.status == "running")
    if lost:  # never a plain "no changes" where changes were lost
        click.secho(f"stockade: {lost}", fg="yellow", err=True)
        if not result and not as_json:
            click.echo(f"sandbox {record.name}: nothing of its changes was saved", err=True)
            return
    branch = f"stockade/{record.name}"
    if as_json:
        data = result.to_dict(include_patch=True)
        data["branch"] = branch if result.commits else None
        click.echo(json.dumps(data, indent=2))
        return
    if stat:
        for change in result:
            suffix = "/" if change.type == "dir" else ""
            click.echo(f"{change.kind[0].upper()} {display_path(change.path)}{suffix}")
    elif result:
        _print_patch(result.patch_bytes())
    _print_diff_summary(record.name, result, branch, include_ignored=include_ignored)


def _project_path(project: Path, arg: str) -> str:
    """A PATH argument as a project-relative posix path (relative to the current directory
    when that is inside the project, else to the project root)."""
    cwd = Path(os.getcwd())
    base = cwd if cwd == project or project in cwd.parents else project
    full = os.path.normpath(os.path.join(base, arg))
    rel = os.path.relpath(full, project)
    if rel == os.curdir:
        return ""
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        raise click.BadParameter(
            f"{arg!r} is outside the sandbox's project {str(project)!r}", param_hint="PATH"
        )
    return Path(rel).as_posix()


def _print_patch(patch: bytes) -> None:
    """The patch as git wrote it (names are quoted by git); coloured on a terminal."""
    out = sys.stdout.buffer
    if not sys.stdout.isatty():
        out.write(patch)
        out.flush()
        return
    colors: tuple[tuple[bytes, bytes], ...] = (
        (b"+++", b"\x1b[1m"),
        (b"---", b"\x1b[1m"),
        (b"+", b"\x1b[32m"),
        (b"-", b"\x1b[31m"),
        (b"@@", b"\x1b[36m"),
        (b"diff --git", b"\x1b[1m"),
    )
    for line in patch.splitlines(keepends=True):
        body = line.rstrip(b"\n")
        # Escape control bytes a patch line could carry to the terminal (ESC, CR...).
        body = bytes(b if b >= 0x20 or b == 0x09 else 0x3F for b in body)
        code = next((c for prefix, c in colors if body.startswith(prefix)), None)
        out.write(code + body + b"\x1b[0m\n" if code else body + b"\n")
    out.flush()


def _print_diff_summary(name: str, result: Any, branch: str, *, include_ignored: bool) -> None:
    if not result and not result.commits:
        click.echo(f"sandbox {name}: no changes", err=True)
    else:
        click.echo(f"sandbox {name}: {result.summary()}", err=True)
    empty = result.empty_dirs
    if empty:
        shown = ", ".join(display_path(p) + "/" for p in empty[:10])
        more = f" and {len(empty) - 10} more" if len(empty) > 10 else ""
        click.echo(f"  new empty directories (not in the patch): {shown}{more}", err=True)
    if result.ignored_paths and not include_ignored:
        first = ", ".join(display_path(p) for p in result.ignored_paths[:5])
        more = ", ..." if len(result.ignored_paths) > 5 else ""
        click.echo(
            f"  {len(result.ignored_paths)} path(s) ignored by .gitignore left out ({first}{more});"
            " show them with --include-ignored",
            err=True,
        )
    for path, reason in result.ignored:
        click.echo(f"  not carried: {display_path(path)}: {reason}", err=True)
    if result.commits:
        click.echo(
            f"  {len(result.commits)} commit(s) made in the sandbox, to become branch "
            f"{branch} on apply:",
            err=True,
        )
        for commit in result.commits[:20]:
            click.echo(f"    {commit.sha[:12]} {display_path(commit.subject)}", err=True)
        if len(result.commits) > 20:
            click.echo(f"    ... and {len(result.commits) - 20} more", err=True)


def _audit(store: Any, record: Any) -> Any:
    from stockade.audit import AuditLog
    from stockade.sandbox import audit_path

    return _CliAuditLog(AuditLog(audit_path(store, record.name, record.id), record.name))


class _CliAuditLog:
    """A sandbox's audit log for the CLI: on a full disk an event that cannot be written
    is a warning, so reading commands (`diff`) still work there."""

    def __init__(self, log: Any) -> None:
        self._log = log

    def append(self, action: str, **kwargs: Any) -> Any:
        from stockade.state import is_disk_full

        try:
            return self._log.append(action, **kwargs)
        except OSError as exc:
            if not is_disk_full(exc, self._log.path):
                raise
            click.secho(
                f"stockade: warning: {action} not recorded in the audit log "
                f"{self._log.path}: {exc.strerror}",
                fg="yellow",
                err=True,
            )
            return None

    def read(self) -> Any:
        return self._log.read()

    def verify(self) -> Any:
        return self._log.verify()


@cli.command()
@click.argument("name", required=False)
@click.argument("paths", nargs=-1, type=click.Path())
@click.option(
    "--conflicts",
    type=click.Choice(["skip", "markers"]),
    default="skip",
    show_default=True,
    help="For text changed on both sides that does not merge: leave it, or write conflict markers.",
)
@click.option("--force", is_flag=True, help="Overwrite host changes with the sandbox's version.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--verbose", "-v", is_flag=True, help="List every path and what happened to it.")
@click.option(
    "--include-ignored", is_flag=True, help="Also apply paths that .gitignore rules leave out."
)
def apply(
    name: str | None,
    paths: tuple[str, ...],
    conflicts: Literal["skip", "markers"],
    force: bool,
    as_json: bool,
    verbose: bool,
    include_ignored: bool,
) -> None:
    """Write the sandbox's workspace changes to the project (all, or just PATHS).

    Text changed both in the sandbox and on the host is merged; what does not merge is left
    alone (or written with conflict markers). Files that configure tools on the host
    (stockade.toml, CI workflows, .vscode/...) and symlinks leaving the project are applied
    only when named in PATHS. The sandbox's commits become branch stockade/NAME. Exits
    with 1 when conflicts remain (left alone or written with markers).
    """
    from stockade import Sandbox

    record = _resolve(_store(), name)
    layers = _layers(record)
    selected = [_project_path(layers.lower, p) for p in paths] if paths else None
    with Sandbox.connect(record.id, actor="cli") as sandbox:  # closing detaches
        result = sandbox.workspace.apply(
            selected, force=force, conflicts=conflicts, include_ignored=include_ignored
        )
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        _print_apply(record.name, result, verbose=verbose)
    if result.conflicts:
        raise SystemExit(1)  # as git merge: conflicts remain to be resolved


def _print_apply(name: str, result: Any, *, verbose: bool) -> None:

    def first(items: list[str], limit: int = 3) -> str:
        text = ", ".join(items[:limit])
        return text + (f" and {len(items) - limit} more" if len(items) > limit else "")

    if verbose:
        for path in result.applied:
            click.echo(f"applied    {display_path(path)}")
        for path in result.merged:
            click.echo(f"merged     {display_path(path)}")
        for conflict in result.conflicts:
            click.echo(f"conflict   {display_path(conflict.path)}: {conflict.reason}")
        for path, reason in result.held:
            click.echo(f"held back  {display_path(path)}: {reason}")
        for path, reason in result.skipped:
            click.echo(f"skipped    {display_path(path)}: {reason}")
    line = f"sandbox {name}: {len(result.applied)} applied, {len(result.merged)} merged"
    if result.conflicts:
        shown = [f"{display_path(c.path)} ({c.reason})" for c in result.conflicts]
        noun = "conflict" if len(result.conflicts) == 1 else "conflicts"
        line += f", {len(result.conflicts)} {noun}: " + first(shown)
    else:
        line += ", 0 conflicts"
    click.echo(line)
    open_conflicts = [c for c in result.conflicts if not c.written]
    if any(c.written for c in result.conflicts):
        marked = [display_path(c.path) for c in result.conflicts if c.written]
        click.secho(f"  resolve the conflict markers in: {first(marked)}", fg="yellow", err=True)
    if any(c.kind == "text" for c in open_conflicts):
        click.secho(
            "  rerun with --conflicts markers to write conflict markers, or --force to "
            "overwrite the host's version",
            fg="yellow",
            err=True,
        )
    elif open_conflicts:
        click.secho("  rerun with --force to overwrite the host's version", fg="yellow", err=True)
    if result.held:
        held = [display_path(p) for p, _ in result.held]
        click.secho(
            f"  {len(result.held)} held back (they configure tools on the host or link outside "
            f"the project): {first(held)}; review them with `stockade diff {name}`, then apply "
            f"them by name: stockade apply {name} PATH...",
            fg="yellow",
            err=True,
        )
    for warning in result.warnings:
        click.secho(f"warning: {warning}", fg="yellow", err=True)
    if result.overwritten:
        overwritten = first([display_path(p) for p in result.overwritten])
        click.secho(f"  --force overwrote host changes in: {overwritten}", fg="yellow", err=True)
    if result.branch:
        count = len(result.commits)
        click.echo(
            f"  the sandbox's {count} commit{'s' if count != 1 else ''} "
            f"{'are' if count != 1 else 'is'} on branch {result.branch}"
        )
    if result.skipped and not verbose:
        click.echo(
            f"  {len(result.skipped)} skipped (already on the host or not applicable; "
            "--verbose lists them)",
            err=True,
        )


@cli.command()
@click.argument("name", required=False)
def reset(name: str | None) -> None:
    """Discard the sandbox's workspace changes (a running sandbox restarts clean)."""
    from stockade import Sandbox

    record = _resolve(_store(), name)
    if record.status != "running":
        _layers(record)  # the error a sandbox without a workspace gets from diff and apply
    with Sandbox.connect(record.name, actor="cli") as sandbox:  # closing detaches
        sandbox.workspace.reset()
    click.echo(f"sandbox {record.name}: workspace reset", err=True)


# --- network ----------------------------------------------------------------------------


@cli.group()
def net() -> None:
    """Change a running sandbox's egress policy, and see its connections."""


@net.command("allow")
@click.argument("name")
@click.argument("entries", nargs=-1, required=True)
def net_allow(name: str, entries: tuple[str, ...]) -> None:
    """Allow hosts (pypi.org, *.example.com, 10.0.0.5, host:443) from now on."""
    with connect_running(name) as sandbox:
        for entry in entries:
            sandbox.network.allow(entry)
            click.echo(f"allowed {entry}")


@net.command("deny")
@click.argument("name")
@click.argument("entries", nargs=-1, required=True)
def net_deny(name: str, entries: tuple[str, ...]) -> None:
    """Deny hosts from now on (deny wins over allow)."""
    with connect_running(name) as sandbox:
        for entry in entries:
            sandbox.network.deny(entry)
            click.echo(f"denied {entry}")


@net.command("log")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
def net_log(name: str, as_json: bool) -> None:
    """Every connection: time, host, port, decision, rule, bytes up/down."""
    import datetime as dt

    with connect_running(name) as sandbox:
        rows = sandbox.network.log()
    for row in rows:
        if as_json:
            click.echo(json.dumps(row))
            continue
        when = dt.datetime.fromtimestamp(row["time"]).strftime("%H:%M:%S")
        rule = row.get("rule") or "-"
        click.echo(
            f"{when} {row['decision']:<7} {row['host']}:{row['port']} rule={rule} "
            f"up={row['bytes_up']} down={row['bytes_down']}"
            + ("" if row["decision"] == "allowed" else f"  ({row['reason']})")
        )


# --- trust ------------------------------------------------------------------------------


@cli.command()
@click.argument("path", required=False)
@click.option("--list", "list_", is_flag=True, help="List the trusted files and their state.")
@click.option("--revoke", is_flag=True, help="Stop trusting the file.")
def trust(path: str | None, list_: bool, revoke: bool) -> None:
    """Trust the project's config file (stockade.toml) as it is now.

    PATH is the file or a project directory (default: the project here). A trusted file may
    weaken the sandbox (backend 'host', an 'rw' workspace, secrets, ...); any change to it
    makes it untrusted again until you trust it anew.
    """
    from stockade.config import project_file_weakenings, trust_store

    store = trust_store()
    if list_:
        if path or revoke:
            raise click.UsageError("--list takes no PATH and no --revoke")
        _list_trusted(store)
        return
    file = _trust_target(path, must_exist=not revoke)
    if revoke:
        if store.revoke(file) is None:
            raise click.ClickException(f"{_shown_path(file)} is not trusted; nothing to revoke")
        click.echo(f"no longer trusted: {_shown_path(file)}")
        return
    digest, weakenings = project_file_weakenings(file)
    store.trust(file, digest)
    click.echo(f"trusted {_shown_path(file)} (sha256 {digest[:16]}...)")
    if weakenings:
        click.secho("it may now weaken the sandbox:", fg="yellow", err=True)
        for w in weakenings:
            line = _shown_path(f"  {w.key} = {w.value}: {w.reason}")
            click.secho(line, fg="yellow", err=True)
    click.echo("any change to the file makes it untrusted again", err=True)


def _trust_target(path: str | None, *, must_exist: bool) -> Path:
    """The project file named by PATH: the file itself, or the one a directory's project uses."""
    from stockade.config.load import PROJECT_FILE, PYPROJECT_FILE, find_project_root

    target = Path(path or ".").absolute()
    if target.is_dir():
        _root, found = find_project_root(target, home=Path.home())
        if found is None:
            raise click.UsageError(
                f"no {PROJECT_FILE} or {PYPROJECT_FILE} with [tool.stockade] in "
                f"{_shown_path(target)} or above; name the file to trust"
            )
        return found
    if target.name not in (PROJECT_FILE, PYPROJECT_FILE):
        raise click.UsageError(
            f"{_shown_path(target)} is not a project config file: stockade reads only "
            f"{PROJECT_FILE} and [tool.stockade] in {PYPROJECT_FILE}"
        )
    if must_exist and not target.is_file():
        raise click.UsageError(f"{_shown_path(target)} does not exist")
    return target


def _list_trusted(store: Any) -> None:
    from stockade.config.trust import file_digest

    records = store.records()
    if not records:
        click.echo("no trusted project files", err=True)
        return
    for record in records.values():
        try:
            now = file_digest(Path(record.path).read_bytes())
        except FileNotFoundError:
            state = "missing"
        except OSError as exc:
            state = f"unreadable ({exc.strerror})"
        else:
            state = "trusted" if now == record.sha256 else "CHANGED (untrusted until trusted again)"
        click.echo(f"{_shown_path(Path(record.path))}  {state}")


def _shown_path(path: Path | str) -> str:
    """Text for a human: control characters and undecodable bytes escaped (``\\r``, ``\\udcff``)."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(path))


# --- audit and doctor -------------------------------------------------------------------


@cli.command()
@click.argument("name", required=False)
@click.option("--verify", is_flag=True, help="Check the hash chain; exit 1 if broken.")
@click.option("--json", "as_json", is_flag=True, help="Print events as JSON lines.")
def audit(name: str | None, verify: bool, as_json: bool) -> None:
    """Show (and verify) the audit log of a sandbox."""
    store = _store()
    record = _resolve(store, name)
    log = _audit(store, record)
    if verify:
        check = log.verify()
        if check.ok:
            click.echo(f"audit log of {record.name}: {check.events} events, chain intact")
            return
        click.secho(
            f"audit log of {record.name} is BROKEN at event {check.first_bad_seq}: {check.reason}",
            fg="red",
            err=True,
        )
        raise SystemExit(1)
    from dataclasses import asdict

    for event in log.read():
        data = asdict(event)
        if as_json:
            click.echo(json.dumps(data))
        else:
            target = f" {data.get('target')}" if data.get("target") else ""
            details = data.get("details") or {}
            extra = f" {json.dumps(details)}" if details else ""
            head = f"{data['seq']:>4} {data['time']} {data['actor']:<10}"
            click.echo(f"{head} {data['action']}{target}{extra}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--measure/--no-measure", default=True, help="Time a sandbox start on each backend.")
@click.option(
    "--fix",
    is_flag=True,
    help="Remove leftovers of sandboxes: directories without a record, records without a "
    "directory, their mounts and containers.",
)
def doctor(as_json: bool, measure: bool, fix: bool) -> None:
    """What each backend needs, and whether it runs on this machine."""
    from stockade.cli.doctor import run_doctor

    with _progress("measuring backends" if measure else "probing backends"):
        run_doctor(as_json, measure, fix=fix)


def _register_extensions() -> None:
    from stockade.cli.microvm import register

    register(cli)


_register_extensions()


class _WarningHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        click.secho(f"stockade: warning: {record.getMessage()}", fg="yellow", err=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    if os.environ.get("STOCKADE_LOG"):
        logging.basicConfig(level=os.environ["STOCKADE_LOG"].upper())
    else:
        # The CLI reports failures itself; library warnings would only repeat them.
        logging.getLogger("stockade").setLevel(logging.ERROR)
        # Except events the audit log missed (a full disk): the user must hear of those.
        missed = logging.getLogger("stockade.sandbox.audit")
        missed.setLevel(logging.WARNING)
        missed.addHandler(_WarningHandler())
        missed.propagate = False
    cli.main(args=list(argv) if argv is not None else None, prog_name="stockade")


if __name__ == "__main__":
    main()
