"""CLI commands for guest images and VM snapshots: ``image build``, ``snapshot``,
``restore``, ``fork``."""

from __future__ import annotations

import time
from typing import Any

import click

__all__ = ["register"]


@click.group()
def image() -> None:
    """Build the guest images the image-based backends boot (locally, no registry)."""


@image.command("build")
@click.option("--profile", default="base", show_default=True, help="Image profile to build.")
@click.option("--rebuild", is_flag=True, help="Build again even if the cache has it.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def image_build(profile: str, rebuild: bool, as_json: bool) -> None:
    """Build the root filesystem, guest kernel, initramfs and erofs root image."""
    import json

    from stockade.images import PROFILES
    from stockade.images.vm import ensure_vm_image

    if profile not in PROFILES:
        raise click.BadParameter(
            f"unknown profile {profile!r}; choose one of: {', '.join(sorted(PROFILES))}",
            param_hint="--profile",
        )
    started = time.monotonic()

    def progress(line: str) -> None:
        click.echo(f"[{time.monotonic() - started:6.1f}s] {line}", err=True)

    built = ensure_vm_image(profile, progress=progress, rebuild=rebuild)
    if as_json:
        click.echo(json.dumps({k: str(v) for k, v in built.__dict__.items()}, indent=2))
        return
    click.echo(f"kernel  {built.kernel} ({built.kernel_version})")
    click.echo(f"initrd  {built.initrd}")
    click.echo(f"rootfs  {built.rootfs}")


@image.command("ls")
def image_ls() -> None:
    """List the image profiles and whether each is built."""
    from stockade.images import PROFILES
    from stockade.images.vm import find_vm_image

    for name, prof in sorted(PROFILES.items()):
        found = find_vm_image(name)
        state = f"built ({found.key})" if found is not None else "not built"
        click.echo(f"{name:<8} {state:<28} {prof.description}")


@click.command()
@click.argument("name")
@click.argument("tag")
def snapshot(name: str, tag: str) -> None:
    """Save a running microVM sandbox's whole state (memory, devices, workspace) as TAG."""
    from stockade.cli.running import connect_running

    started = time.monotonic()
    with connect_running(name) as sandbox:
        path = sandbox.snapshot(tag)
    click.echo(f"sandbox {name}: snapshot {tag} saved in {time.monotonic() - started:.2f} s")
    click.echo(str(path))


@click.command()
@click.argument("name")
@click.argument("tag")
def restore(name: str, tag: str) -> None:
    """Put a running microVM sandbox back into its snapshot TAG."""
    from stockade.cli.running import connect_running

    started = time.monotonic()
    with connect_running(name) as sandbox:
        sandbox.restore(tag)
    click.echo(f"sandbox {name}: restored {tag} in {time.monotonic() - started:.2f} s", err=True)


@click.command()
@click.argument("name")
@click.option("--name", "new_name", help="Name of the new sandbox (default: generated).")
@click.option("--tag", help="Start from this existing snapshot instead of one taken now.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def fork(name: str, new_name: str | None, tag: str | None, as_json: bool) -> None:
    """Start a new sandbox from a snapshot of NAME (taken now, workspace included)."""
    import json

    from stockade.backends.microvm.snapshots import policy_of, snapshot_dir_for
    from stockade.cli.running import connect_running, running_record
    from stockade.cli.supervise import spawn_supervisor
    from stockade.state import StateStore

    record = running_record(name)
    if tag is None:
        tag = f"fork-{time.strftime('%Y%m%d-%H%M%S')}"
        with connect_running(name) as sandbox:
            path = sandbox.snapshot(tag)
    else:
        path = snapshot_dir_for(StateStore().root, record.name, tag)
    result = spawn_supervisor(policy_of(path), new_name, resume=path)
    if as_json:
        click.echo(json.dumps({**result, "snapshot": str(path)}))
    else:
        click.echo(result["name"])


def register(cli: Any) -> None:
    """Add these commands to the ``stockade`` group."""
    for command in (image, snapshot, restore, fork):
        cli.add_command(command)
