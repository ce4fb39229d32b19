"""Engine discovery through the `multiproxy.engines` entry-point group, and validation of what each provides."""
from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass
from importlib import metadata

from .engine import Engine

ENTRY_POINT_GROUP = "multiproxy.engines"
# Directories (os.pathsep-separated) holding third-party engine distributions installed with
# `pip install --target DIR`: their dist-info entry points are read there, and DIR joins sys.path.
PLUGIN_PATH_ENV = "MULTIPROXY_PLUGIN_PATH"


class PluginError(Exception):
    """A plugin that cannot be used; the message names the plugin, its distribution and what is wrong."""


@dataclass(frozen=True)
class LoadedEngine:
    name: str
    engine: Engine
    distribution: str
    version: str
    target: str          # "package.module:Class"


def _distribution_of(ep) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown distribution", ""
    return dist.metadata["Name"], dist.version


def validate_engine_class(cls, name: str, where: str) -> list[str]:
    """Every way `cls` breaks the engine contract, as readable sentences."""
    problems = []
    if not inspect.isclass(cls) or not issubclass(cls, Engine):
        return [f"{where}: {cls!r} is not a subclass of multiproxy.engine.Engine"]
    if not isinstance(cls.name, str) or not cls.name:
        problems.append(f"{where}: class attribute `name` is missing")
    elif cls.name != name:
        problems.append(f"{where}: entry point is named {name!r} but the engine calls itself {cls.name!r}")
    if not isinstance(cls.default_port, int) or not 0 < cls.default_port < 65536:
        problems.append(f"{where}: class attribute `default_port` must be a TCP port, got {cls.default_port!r}")
    for method in Engine.required_methods:
        impl = getattr(cls, method, None)
        if impl is None or impl is getattr(Engine, method):
            problems.append(f"{where}: method `{method}` is not implemented")
    return problems


def plugin_path() -> list[str]:
    """The extra plugin directories: $MULTIPROXY_PLUGIN_PATH, then, in the single-file executable, the
    `plugins` directory beside it (the executable sees none of the machine's site-packages)."""
    paths = [p for p in os.environ.get(PLUGIN_PATH_ENV, "").split(os.pathsep) if p]
    if getattr(sys, "frozen", False):
        paths.append(os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "plugins"))
    return [os.path.abspath(p) for p in paths if os.path.isdir(p)]


def discover_entry_points() -> list:
    """The group's entry points from the import path, then those of the distributions in plugin_path()."""
    found = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    extra = plugin_path()
    if extra:
        seen = {(ep.name, ep.value) for ep in found}
        for path in extra:
            if path not in sys.path:
                sys.path.append(path)
        for dist in metadata.distributions(path=extra):
            for ep in dist.entry_points.select(group=ENTRY_POINT_GROUP):
                if (ep.name, ep.value) not in seen:
                    seen.add((ep.name, ep.value))
                    found.append(ep)
    return found


def load_engines(entry_points=None) -> dict[str, LoadedEngine]:
    """Load every engine plugin; raise PluginError listing each broken one."""
    if entry_points is None:
        entry_points = discover_entry_points()
    loaded: dict[str, LoadedEngine] = {}
    problems: list[str] = []
    for ep in entry_points:
        dist, version = _distribution_of(ep)
        where = f"engine plugin {ep.name!r} ({ep.value}) from distribution {dist}"
        try:
            cls = ep.load()
        except Exception as exc:  # a plugin's import error must not hide which plugin broke
            problems.append(f"{where}: cannot be imported: {type(exc).__name__}: {exc}")
            continue
        found = validate_engine_class(cls, ep.name, where)
        if found:
            problems.extend(found)
            continue
        if ep.name in loaded:
            other = loaded[ep.name]
            problems.append(f"{where}: name {ep.name!r} is already taken by {other.target} from {other.distribution}")
            continue
        try:
            engine = cls()
        except Exception as exc:
            problems.append(f"{where}: constructor failed: {type(exc).__name__}: {exc}")
            continue
        loaded[ep.name] = LoadedEngine(ep.name, engine, dist, version, ep.value)
    if problems:
        raise PluginError("\n".join(problems))
    return loaded
