"""Live reload: what differs between the running config and the file read again, what of it applies live and what
needs a restart (pure), and the reload itself (read, validate, diff, apply to the Proxy all or nothing)."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from .config import Config, ConfigError, load_config

log = logging.getLogger("multiproxy.reload")

# Values never written to the log: a changed one is logged as "(changed)".
SECRET_FIELDS = ("password", "password_command")


@dataclass
class Plan:
    """The difference between two configs. `changes`: one line per changed key ("clusters.main.pool.max_size:
    3 -> 10"); `refused`: "key path: why it needs a restart" (any of them and nothing is applied)."""

    old: Config
    new: Config
    changes: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    clusters_added: list[str] = field(default_factory=list)
    clusters_removed: list[str] = field(default_factory=list)
    clusters_changed: list[str] = field(default_factory=list)
    listeners_added: list[str] = field(default_factory=list)
    listeners_removed: list[str] = field(default_factory=list)
    listeners_changed: list[str] = field(default_factory=list)
    listeners_moved: list[str] = field(default_factory=list)     # same name, another listen address: bound anew
    proxy_changed: list[str] = field(default_factory=list)       # names of [proxy] settings that changed

    @property
    def empty(self) -> bool:
        return not self.changes and not self.refused


def flatten(value, path: str, out: dict) -> dict:
    """Key path -> leaf value of a config object (dataclasses, dicts and tuples of dataclasses walked; fields
    declared compare=False, e.g. a listener's token verifier, and a credential's key_path left out)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            if not f.compare or f.name == "key_path":
                continue
            flatten(getattr(value, f.name), f"{path}.{f.name}" if path else f.name, out)
    elif isinstance(value, dict):
        for key, item in value.items():
            flatten(item, f"{path}.{key}", out)
        if not value:
            out[path] = {}
    elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
        for i, item in enumerate(value):
            flatten(item, f"{path}[{i}]", out)
    else:
        out[path] = value
    return out


def _show(key: str, value) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int):
        return f"{value[0]}:{value[1]}"
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return "[" + ", ".join(_show(key, v) for v in value) + "]"
    return repr(value)


def _changed_lines(old, new, path: str) -> list[str]:
    """'key: old -> new' for each key that differs between two config objects (either may be None: added or
    removed as a whole)."""
    before = flatten(old, path, {}) if old is not None else {}
    after = flatten(new, path, {}) if new is not None else {}
    lines = []
    for key in list(before) + [k for k in after if k not in before]:
        a, b = before.get(key, _MISSING), after.get(key, _MISSING)
        if a == b or (a is None and b is _MISSING) or (a is _MISSING and b is None):
            continue    # an optional table added or removed: its keys' own lines say what changed
        if key.rsplit(".", 1)[-1] in SECRET_FIELDS:
            lines.append(f"{key}: (changed)")
        else:
            lines.append(f"{key}: {'(unset)' if a is _MISSING else _show(key, a)} -> "
                         f"{'(unset)' if b is _MISSING else _show(key, b)}")
    return lines


_MISSING = object()


def diff(old: Config, new: Config) -> Plan:
    """Compare the running config with a new one: what changed, and what of it cannot change without a restart."""
    plan = Plan(old, new)
    for name in ("workers", "admin_listen", "takeover_socket", "worker_custody", "relay"):
        a, b = getattr(old.proxy, name), getattr(new.proxy, name)
        if a != b:
            why = {"workers": "the worker processes are forked at start",
                   "relay": "the relay lanes are set up at start",
                   "admin_listen": "the admin HTTP server is bound once, at start",
                   "takeover_socket": "the takeover socket is bound once, at start",
                   "worker_custody": "the supervisor sets up the custody of clients when it forks the workers"}[name]
            plan.refused.append(f"proxy.{name}: {a!r} -> {b!r} needs a restart ({why})")
    for f in dataclasses.fields(old.proxy):
        if getattr(old.proxy, f.name) != getattr(new.proxy, f.name):
            plan.proxy_changed.append(f.name)
            if f.name not in ("workers", "admin_listen", "takeover_socket", "worker_custody", "relay"):
                plan.changes.append(f"proxy.{f.name}: {_show('', getattr(old.proxy, f.name))} -> "
                                    f"{_show('', getattr(new.proxy, f.name))}")
    plan.changes += _changed_lines(old.admin, new.admin, "admin")
    if old.users_file != new.users_file:
        plan.changes.append(f"auth.users_file: {old.users_file!r} -> {new.users_file!r}")

    for name in old.clusters:
        if name not in new.clusters:
            plan.clusters_removed.append(name)
            plan.changes.append(f"clusters.{name}: removed")
    for name, cluster in new.clusters.items():
        before = old.clusters.get(name)
        if before is None:
            plan.clusters_added.append(name)
            plan.changes.append(f"clusters.{name}: added ({cluster.engine}, "
                                + ", ".join(_show("", h) for h in cluster.hosts or cluster.endpoints.values()) + ")")
            continue
        if before == cluster:
            continue
        if before.engine != cluster.engine:
            plan.refused.append(f"clusters.{name}.engine: {before.engine!r} -> {cluster.engine!r} needs a restart "
                                "(clients of the old engine are connected to this cluster's listeners; or add a "
                                "cluster under a new name and point new listeners at it)")
            continue
        plan.clusters_changed.append(name)
        plan.changes += _changed_lines(before, cluster, f"clusters.{name}")

    old_listeners = {lc.name: lc for lc in old.listeners}
    new_listeners = {lc.name: lc for lc in new.listeners}
    for name, lc in old_listeners.items():
        if name not in new_listeners:
            plan.listeners_removed.append(name)
            plan.changes.append(f"listeners.{name}: removed ({_show('', lc.listen)}: stops accepting, its clients "
                                "finish their transaction and are closed)")
    for name, lc in new_listeners.items():
        before = old_listeners.get(name)
        if before is None:
            plan.listeners_added.append(name)
            plan.changes.append(f"listeners.{name}: added ({_show('', lc.listen)}, cluster {lc.cluster}, {lc.role})")
            continue
        was_engine = old.clusters[before.cluster].engine
        now_engine = new.clusters[lc.cluster].engine
        if was_engine != now_engine:
            plan.refused.append(f"listeners.{name}.cluster: {before.cluster!r} -> {lc.cluster!r} would change the "
                                f"listener's engine from {was_engine} to {now_engine} under its connected clients; "
                                "give the new listener another name (the old one drains) or restart")
            continue
        if before == lc:
            continue
        plan.listeners_changed.append(name)
        if before.listen != lc.listen:
            plan.listeners_moved.append(name)
        plan.changes += _changed_lines(before, lc, f"listeners.{name}")
    # A listener may not take the address that another, still-open listener holds until it closes.
    freed = {old_listeners[n].listen for n in plan.listeners_removed + plan.listeners_moved}
    held = {lc.listen: lc.name for lc in old.listeners}
    for name in plan.listeners_added + plan.listeners_moved:
        address = new_listeners[name].listen
        if address in held and held[address] != name and address not in freed:
            plan.refused.append(f"listeners.{name}.listen: {_show('', address)} is held by listener "
                                f"{held[address]!r}")
        elif address in freed and held.get(address) != name:
            plan.refused.append(f"listeners.{name}.listen: {_show('', address)} is still open for listener "
                                f"{held[address]!r}, which drains its clients first; use another address, or reload "
                                "twice (remove the old listener, then add the new one)")
    return plan


def read(path: str, engines: dict) -> tuple[Config | None, list[str]]:
    """Read and validate `path` as a start would (load_config, then what the machine lacks for it: files,
    folders); (config, []) or (None, every problem with its key path). Missing backend password sources are
    logged as warnings, as at start (a login that needs one tells its client)."""
    from .preflight import machine_problems
    try:
        config = load_config(path, engines)
    except ConfigError as exc:
        return None, list(exc.problems)
    problems = []
    for key_path, message in machine_problems(config, check_addresses=False):
        if ".credentials[" in key_path:
            log.warning("%s: %s (its users' logins fail until it is fixed)", key_path, message)
        else:
            problems.append(f"{key_path}: {message}")
    return (None, problems) if problems else (config, [])


def reload(proxy, apply: bool = True) -> list[str]:
    """Read the proxy's config file again and apply what changed, all or nothing: the problems (each logged, with
    its key path), or [] when applied (or, with `apply` False, when it would apply)."""
    path = proxy.config.source
    plan = None
    who = f" (worker {proxy.worker})" if getattr(proxy, "worker_count", 1) > 1 else ""
    if not path:
        problems = ["this proxy was not started from a config file: nothing to reload"]
    else:
        new, problems = read(path, proxy.engines)
        if new is not None:
            plan = diff(proxy.config, new)
            problems = list(plan.refused)
            if not problems and apply:
                problems = proxy.apply_plan(plan)
    if problems:
        for problem in problems:
            log.error("reload: %s", problem)
        log.error("reload failed%s (%d problem(s)): nothing changed, the running configuration stays", who,
                  len(problems))
        if apply:
            # Token keys are data that rotates on its own schedule (token_keys_check_interval reloads them without
            # any signal): the running listeners re-read theirs all the same; a bad key file keeps the old keys.
            for lc in proxy.config.listeners:
                if hasattr(lc.token_verifier, "reload"):
                    lc.token_verifier.reload()
    elif apply:
        if plan.empty:
            log.info("reload%s: the configuration is unchanged (users file, token keys and TLS files re-read)", who)
        else:
            log.info("reload%s: %d change(s) applied", who, len(plan.changes))
    return problems
