"""The `multiproxy lab` commands: up, down, env, status and failover of a local lab of databases behind the proxy."""
from __future__ import annotations

import shlex
import sys

import click

__all__ = ["lab"]

_dir_option = click.option(
    "--dir", "lab_dir", type=click.Path(file_okay=False), envvar="MULTIPROXY_LAB_DIR",
    help="The lab's directory (default ~/.multiproxy/lab, or $MULTIPROXY_LAB_DIR).")


def _lab(lab_dir):
    from .stack import Lab
    return Lab(lab_dir, out=click.echo)


def _run(action):
    from .stack import LabError
    try:
        code = action()
    except LabError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    sys.exit(code)


@click.group()
def lab():
    """A local lab: private database servers with replicas, and multiproxy in front of them."""


@lab.command()
@click.option("--engines", default="postgres,mysql,tds", show_default=True,
              help="Comma-separated engines to start: postgres, mysql (MariaDB), tds (the TDS lab server).")
@_dir_option
@click.option("--detach", is_flag=True, help="Leave everything running in the background and return.")
def up(engines, lab_dir, detach):
    """Start the lab's servers and multiproxy; print endpoints and connection strings.

    Without --detach it runs until Ctrl-C, then stops everything and removes the lab.
    """
    from .parts import PARTS
    names = [e.strip() for e in engines.split(",") if e.strip()]
    unknown = [e for e in names if e not in PARTS]
    if unknown or not names:
        raise click.UsageError(f"--engines: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(PARTS)}")
    _run(lambda: _lab(lab_dir).up(names, detach))


@lab.command()
@_dir_option
@click.option("--keep", is_flag=True, help="Keep the lab's directory (data, logs, config) after stopping.")
def down(lab_dir, keep):
    """Stop every process of the lab and remove its directory (unless --keep)."""
    _run(lambda: _lab(lab_dir).down(keep))


@lab.command()
@_dir_option
def env(lab_dir):
    """Print `export` lines for the lab's URLs and PG* variables: eval "$(multiproxy lab env)"."""
    def action():
        for name, value in _lab(lab_dir).env().items():
            click.echo(f"export {name}={shlex.quote(value)}")
        return 0
    _run(action)


@lab.command()
@click.argument("engine")
@_dir_option
@click.option("--no-rebuild", is_flag=True,
              help="Leave the old writer stopped instead of rebuilding it as a reader of the new one.")
def failover(engine, lab_dir, no_rebuild):
    """Fail the ENGINE cluster over while clients stay connected (ENGINE: postgres, mysql or tds).

    Runs a write loop through the proxy's writer listener, stops the writer (fast shutdown), promotes the
    standby, repoints the writer and reader endpoints in the lab's DNS, and prints the outage seen through
    the proxy and the registry's writer-change event. Then it rebuilds the old writer as a reader of the
    new one, so that the next failover goes back.
    """
    from .failover import failover as run_failover
    from .parts import PARTS
    if engine not in PARTS:
        raise click.UsageError(f"unknown engine {engine!r}; choose from {', '.join(PARTS)}")
    _run(lambda: run_failover(_lab(lab_dir), engine, rebuild=not no_rebuild))


@lab.command()
@_dir_option
def status(lab_dir):
    """Show the lab's processes, backends with their verified roles, pools and pins.

    Exits 1 when no lab runs in the directory, 2 when part of it is down or a role differs.
    """
    _run(lambda: _lab(lab_dir).status())
