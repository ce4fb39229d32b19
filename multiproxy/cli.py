"""The `multiproxy` command line: run, check-config, engines, status, admin, reload, users, and lab (loaded on demand)."""
from __future__ import annotations

import json
import logging
import os
import sys

import click

from . import __version__


def _patch():
    from gevent import monkey
    if not monkey.is_module_patched("socket"):
        monkey.patch_all()


def _load_engines():
    from .plugins import PluginError, load_engines
    try:
        return load_engines()
    except PluginError as exc:
        click.echo(f"error: engine plugins failed to load:\n{exc}", err=True)
        sys.exit(2)


def _load_config(path):
    from .config import ConfigError, load_config
    loaded = _load_engines()
    engines = {name: le.engine for name, le in loaded.items()}
    try:
        config = load_config(path, engines)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    return config, engines


LAB_EXTRA = "the lab needs the lab extra: pip install 'multiproxy[lab]'"


class _Commands(click.Group):
    """The command group; `lab` (multiproxy.lab, an optional part) is imported only when it is looked up."""

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), "lab"})

    def get_command(self, ctx, name):
        if name == "lab" and name not in self.commands:
            return _lab_command()
        return super().get_command(ctx, name)


def _lab_command() -> click.Command:
    """`multiproxy lab` from multiproxy.lab.cli, or, without the lab extra's dependencies, a command that says
    how to install them and exits 2."""
    from .lab import missing_requirements
    missing = missing_requirements()
    if not missing:
        from .lab.cli import lab
        return lab

    def unavailable(args):
        click.echo(f"error: {LAB_EXTRA} (missing: {', '.join(missing)})", err=True)
        sys.exit(2)

    return click.Command(
        "lab", callback=unavailable, add_help_option=False,
        params=[click.Argument(["args"], nargs=-1, type=click.UNPROCESSED)],
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        help=f"A local lab of database servers behind the proxy; not installed: {LAB_EXTRA}.",
        short_help="A local lab (needs the lab extra: multiproxy[lab]).")


@click.group(cls=_Commands)
@click.version_option(__version__, prog_name="multiproxy")
def cli():
    """multiproxy: one proxy for PostgreSQL, MySQL/MariaDB and SQL Server clients, with transaction pooling."""


@cli.command()
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False), help="TOML config file")
@click.option("--takeover", "take_over", is_flag=True,
              help="take the listening sockets and the idle clients over from the multiproxy running with this config "
                   "(through proxy.takeover_socket), which then drains and exits: a restart or upgrade that keeps "
                   "clients connected")
@click.option("--takeover-if-running", "take_over_if_running", is_flag=True,
              help="as --takeover when a multiproxy runs with this config, else start as without it (for service "
                   "managers that start the next process the same way as the first: docs/deploy.md)")
def run(config_path, take_over, take_over_if_running):
    """Run the proxy in the foreground, logging to stderr."""
    _patch()
    config, engines = _load_config(config_path)
    # Binding reports an address in use itself; everything else a start needs is checked up front, together.
    _exit_on_machine_problems(config_path, config, check_addresses=False, credentials=False)
    logging.basicConfig(level=config.proxy.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .preflight import machine_problems
    for key_path, message in machine_problems(config, check_addresses=False):
        if ".credentials[" in key_path:
            logging.getLogger("multiproxy").warning("%s: %s (its users' logins fail until it is fixed)",
                                                    key_path, message)
    from .auth import UsersFileError
    from .proxy import run_forever
    from .takeover import TakeoverError
    try:
        code = run_forever(config, engines, take_over="if-running" if take_over_if_running else take_over)
    except UsersFileError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except TakeoverError as exc:
        click.echo(f"error: cannot take over: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"error: cannot start: {exc}", err=True)
        sys.exit(1)
    sys.exit(code)


@cli.command("check-config")
@click.argument("config_path", type=click.Path(dir_okay=False))
@click.option("--syntax-only", is_flag=True,
              help="check the file alone, not what it names on this machine (for a config meant for another host)")
def check_config(config_path, syntax_only):
    """Validate a config file and what a start would need here; print every problem with its key path."""
    config, _ = _load_config(config_path)
    if not syntax_only:
        _exit_on_machine_problems(config_path, config, check_addresses=True)
    what = "syntax ok" if syntax_only else "ok"
    click.echo(f"{config_path}: {what} ({len(config.clusters)} cluster(s), {len(config.listeners)} listener(s))")


def _exit_on_machine_problems(config_path, config, check_addresses: bool, credentials: bool = True) -> None:
    """Print what this machine lacks for `config` (multiproxy.preflight) and exit 2, if anything."""
    from .preflight import machine_problems
    problems = machine_problems(config, check_addresses=check_addresses, credentials=credentials)
    if problems:
        lines = "\n".join(f"  {key_path}: {message}" for key_path, message in problems)
        click.echo(f"error: {config_path}: {len(problems)} problem(s) on this machine:\n{lines}\n"
                   "(check-config --syntax-only checks a config meant for another host)", err=True)
        sys.exit(2)


@cli.command()
def engines():
    """List the engine plugins found through the multiproxy.engines entry point."""
    for name, le in sorted(_load_engines().items()):
        click.echo(f"{name:10} {le.target:40} {le.distribution} {le.version}  {le.engine.description}")


@cli.command()
@click.option("--admin", default="127.0.0.1:9930", show_default=True, help="the proxy's admin_listen address")
def status(admin):
    """Show listeners, pools and pins of a running proxy (from its admin server)."""
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://{admin}/status", timeout=5) as resp:
            data = json.load(resp)
    except OSError as exc:
        click.echo(f"error: no multiproxy admin server answers on {admin}: {exc}", err=True)
        sys.exit(1)
    click.echo(f"uptime {data['uptime_seconds']} s")
    for lst in data["listeners"]:
        click.echo(f"listener {lst['name']:12} {lst['engine']:9} {lst['listen']:22} {lst['cluster']}/{lst['role']} "
                   f"clients={lst['clients']}")
    for pool in data["pools"]:
        click.echo(f"pool {pool['pool']:40} size={pool['size']}/{pool['max_size']} idle={pool['idle']} "
                   f"borrowed={pool['borrowed']} waiting={pool['waiting']}")
    for cluster, pins in data["pins"].items():
        if pins["now"] or pins["detected_total"]:
            click.echo(f"pins {cluster}: now {pins['now']} detected {pins['detected_total']}")
    for worker in data.get("workers", []):      # with proxy.workers > 1: the figures above are the group's
        click.echo(f"worker {worker['worker']} pid={worker.get('pid')} up={worker.get('up')} "
                   f"restarts={worker.get('restarts')} answered={'yes' if worker.get('answered') else 'no'}")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("--admin", "admin_address", default="127.0.0.1:9930", show_default=True,
              help="the proxy's admin_listen address")
@click.option("--json", "as_json", is_flag=True, help="print the JSON answer as it came")
@click.option("--token-env", default="MULTIPROXY_ADMIN_TOKEN", show_default=True,
              help="environment variable holding the admin token, sent when set (see [admin] http_token_env)")
@click.argument("words", nargs=-1, required=True)
def admin(admin_address, as_json, token_env, words):
    """Run an admin console command on a running proxy: `multiproxy admin SHOW POOLS`, `multiproxy admin PAUSE db`
    (the views and commands of the PostgreSQL console database `pgbouncer`, over the admin HTTP server)."""
    import urllib.parse
    import urllib.request
    verb = words[0].upper()
    if verb == "SHOW":
        if len(words) < 2:
            click.echo("error: SHOW needs a view name, e.g. `multiproxy admin SHOW POOLS` (SHOW HELP lists them)", err=True)
            sys.exit(2)
        request = urllib.request.Request(f"http://{admin_address}/admin/{urllib.parse.quote(words[1].lower())}")
    else:
        path = "/".join(urllib.parse.quote(w, safe="") for w in (verb.lower(), *words[1:]))
        request = urllib.request.Request(f"http://{admin_address}/admin/{path}", data=b"", method="POST")
    data = _admin_request(request, admin_address, token_env, timeout=600)
    if as_json:
        click.echo(json.dumps(data, indent=1))
        return
    columns = [c["name"] for c in data.get("columns", [])]
    if not columns:
        click.echo(data.get("command", "done"))
        return
    cells = [columns] + [["" if v is None else str(v) for v in row] for row in data["rows"]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for n, row in enumerate(cells):
        click.echo(" | ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
        if n == 0:
            click.echo("-+-".join("-" * w for w in widths))
    click.echo(f"({len(data['rows'])} row{'s' if len(data['rows']) != 1 else ''})")


def _admin_request(request, admin_address: str, token_env: str, timeout: float, unreachable_hint: str = "") -> dict:
    """Send `request` to the admin HTTP server with the token from `token_env` (when set); its JSON answer, or the
    error printed and exit 1."""
    import urllib.error
    import urllib.request
    token = os.environ.get(token_env, "") if token_env else ""
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc).get("error", str(exc))
        except ValueError:
            message = str(exc)
        click.echo(f"error: {message}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"error: no multiproxy admin server answers on {admin_address}: {exc}{unreachable_hint}", err=True)
        sys.exit(1)


@cli.command()
@click.option("--admin", "admin_address", default="127.0.0.1:9930", show_default=True,
              help="the proxy's admin_listen address")
@click.option("--token-env", default="MULTIPROXY_ADMIN_TOKEN", show_default=True,
              help="environment variable holding the admin token, sent when set (see [admin] http_token_env)")
@click.option("--pid", type=int, default=None,
              help="send SIGHUP to this process instead (no answer: the proxy's log says what changed or why not)")
def reload(admin_address, token_env, pid):
    """Reload a running proxy's config file: what changed applies live; with any problem nothing changes and every
    problem is printed with its key path. Asks the admin HTTP server (POST /admin/reload), which answers whether the
    reload succeeded; --pid signals the process instead."""
    if pid is not None:
        import signal
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError as exc:
            click.echo(f"error: cannot signal process {pid}: {exc.strerror}", err=True)
            sys.exit(1)
        click.echo(f"SIGHUP sent to {pid}; the proxy's log says what changed, or why nothing did")
        return
    import urllib.request
    request = urllib.request.Request(f"http://{admin_address}/admin/reload", data=b"", method="POST")
    _admin_request(request, admin_address, token_env, timeout=60,
                   unreachable_hint="; or signal the process: multiproxy reload --pid PID")
    click.echo("reloaded; the proxy's log lists each change")


def _register_subcommands():
    from .users_cmd import users
    cli.add_command(users)


_register_subcommands()


def main():
    cli(prog_name="multiproxy")
