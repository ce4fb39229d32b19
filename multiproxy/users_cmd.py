"""The `multiproxy users` commands: add, remove and list proxy users in the users file."""
from __future__ import annotations

import os
import sys

import click

from multiproxy.auth import POOL_MODES, UsersFile, UsersFileError, engine_verifier_kinds

__all__ = ["users"]

DEFAULT_USERS_FILE = "users.toml"

_users_file_option = click.option(
    "--users-file",
    "users_file",
    type=click.Path(dir_okay=False),
    default=DEFAULT_USERS_FILE,
    show_default=True,
    envvar="MULTIPROXY_USERS_FILE",
    help="The users file to edit (env MULTIPROXY_USERS_FILE).",
)


def _load(path: str, *, missing_ok: bool) -> UsersFile:
    if missing_ok and not os.path.exists(path):
        return UsersFile.empty()
    try:
        return UsersFile.load(path)
    except UsersFileError as e:
        raise click.ClickException(str(e)) from None


def _save(users_file: UsersFile, path: str) -> None:
    try:
        users_file.save(path)
    except OSError as e:
        raise click.ClickException("%s: cannot write: %s" % (path, e.strerror or e)) from None


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        if password.endswith("\r"):
            password = password[:-1]
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt="Repeat password")
    if not password:
        raise click.ClickException("the password is empty; nothing was changed")
    return password


@click.group()
def users() -> None:
    """Manage proxy users (stored as SCRAM/md5 verifiers, never plaintext)."""


@users.command("add")
@click.argument("name")
@_users_file_option
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin instead of prompting.")
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    help="Verifier kind to store; repeat for several: scram_sha_256, md5 and those the engines declare "
         "(mysql_native_password, caching_sha2_password, tds_sha256 with the built-in ones). "
         "Default: scram_sha_256 and md5.",
)
@click.option("--listener", "listeners", multiple=True, help="Listener this user may use; repeat for several. Default: all.")
@click.option("--max-connections", type=click.IntRange(min=0), default=None, help="Connection limit for this user, 0 = unlimited.")
@click.option("--pool-mode", type=click.Choice(POOL_MODES), default=None, help="Override the listener's pool mode for this user.")
def add_user(name, users_file, password_stdin, kinds, listeners, max_connections, pool_mode) -> None:
    """Add user NAME, or set a new password for an existing one."""
    known = engine_verifier_kinds()
    unknown = [k for k in kinds if k not in known]
    if unknown:
        raise click.BadParameter(f"unknown verifier kind {', '.join(unknown)} (known: {', '.join(sorted(known))})",
                                 param_hint="'--kind'")
    table = _load(users_file, missing_ok=True)
    existed = name in table
    password = _read_password(password_stdin)
    settings = {}
    if listeners:
        settings["listeners"] = listeners
    if pool_mode is not None:
        settings["pool_mode"] = pool_mode
    try:
        record = table.add(
            name,
            password,
            kinds or ("scram_sha_256", "md5"),
            max_connections=max_connections,
            **settings,
        )
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    _save(table, users_file)
    click.echo(
        "%s user %s in %s (%s)"
        % ("updated" if existed else "added", name, users_file, ", ".join(sorted(record.verifiers)))
    )


@users.command("remove")
@click.argument("name")
@_users_file_option
def remove_user(name, users_file) -> None:
    """Remove user NAME."""
    table = _load(users_file, missing_ok=False)
    if name not in table:
        raise click.ClickException("%s: no user %s (see `multiproxy users list`)" % (users_file, name))
    table.remove(name)
    _save(table, users_file)
    click.echo("removed user %s from %s" % (name, users_file))


@users.command("list")
@_users_file_option
def list_users(users_file) -> None:
    """List users with their verifier kinds and limits (never the verifiers themselves)."""
    table = _load(users_file, missing_ok=False)
    for name in table.names():
        user = table.get(name)
        parts = ["verifiers=" + ",".join(sorted(user.verifiers))]
        parts.append("listeners=" + (",".join(user.listeners) if user.listeners is not None else "*"))
        parts.append("max_connections=" + (str(user.max_connections) if user.max_connections else "unlimited"))
        if user.pool_mode:
            parts.append("pool_mode=" + user.pool_mode)
        click.echo("%s\t%s" % (name, " ".join(parts)))
