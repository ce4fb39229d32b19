"""load_engines: engines found through entry points, validated at load, errors naming the plugin and what is wrong."""
from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from multiproxy.engine import Engine
from multiproxy.plugins import ENTRY_POINT_GROUP, PluginError, load_engines, validate_engine_class


class GoodEngine(Engine):
    name = "good"
    default_port = 7000

    def client_protocol(self, ctx):
        return None

    def backend_login(self, target):
        return None

    def cancel_script(self, target, server_state):
        return None

    def render_error(self, kind, message):
        return b""


class HalfEngine(Engine):
    """Implements only client_protocol."""

    name = "half"
    default_port = 7001

    def client_protocol(self, ctx):
        return None


class NamelessEngine(GoodEngine):
    name = ""


class BadPortEngine(GoodEngine):
    name = "badport"
    default_port = 70000


class ExplodingEngine(GoodEngine):
    name = "exploding"

    def __init__(self):
        raise RuntimeError("no licence file")


class NotAnEngine:
    name = "stranger"


def entry_point(name: str, target: str) -> EntryPoint:
    return EntryPoint(name, f"{__name__}:{target}", ENTRY_POINT_GROUP)


def load_error(*entry_points) -> str:
    with pytest.raises(PluginError) as info:
        load_engines(list(entry_points))
    return str(info.value)


def test_a_complete_engine_loads():
    loaded = load_engines([entry_point("good", "GoodEngine")])
    assert list(loaded) == ["good"]
    assert isinstance(loaded["good"].engine, GoodEngine)
    assert loaded["good"].target == f"{__name__}:GoodEngine"


def test_missing_methods_are_named_with_the_plugin():
    message = load_error(entry_point("half", "HalfEngine"))
    assert "'half'" in message and f"{__name__}:HalfEngine" in message
    for method in ("backend_login", "cancel_script", "render_error"):
        assert f"`{method}`" in message
    assert "`client_protocol`" not in message


def test_every_broken_plugin_is_reported_and_good_ones_do_not_hide_them():
    message = load_error(entry_point("good", "GoodEngine"), entry_point("half", "HalfEngine"),
                         entry_point("badport", "BadPortEngine"))
    assert "'half'" in message and "'badport'" in message and "70000" in message


def test_entry_point_name_must_match_the_engine_name():
    message = load_error(entry_point("other", "GoodEngine"))
    assert "'other'" in message and "'good'" in message


def test_missing_name_attribute():
    assert "`name` is missing" in load_error(entry_point("nameless", "NamelessEngine"))


def test_not_a_subclass_of_engine():
    assert "not a subclass of multiproxy.engine.Engine" in load_error(entry_point("stranger", "NotAnEngine"))


def test_import_failure_names_the_plugin():
    message = load_error(EntryPoint("ghost", "no_such_module_for_multiproxy:Engine", ENTRY_POINT_GROUP))
    assert "'ghost'" in message and "cannot be imported" in message and "ModuleNotFoundError" in message


def test_missing_attribute_in_an_existing_module():
    message = load_error(entry_point("missing", "NoSuchClass"))
    assert "'missing'" in message and "cannot be imported" in message


def test_constructor_failure_names_the_plugin():
    message = load_error(entry_point("exploding", "ExplodingEngine"))
    assert "'exploding'" in message and "constructor failed" in message and "no licence file" in message


def test_duplicate_names_are_refused():
    message = load_error(entry_point("good", "GoodEngine"), entry_point("good", "GoodEngine"))
    assert "already taken" in message


def test_errors_name_an_unknown_distribution_for_bare_entry_points():
    assert "unknown distribution" in load_error(entry_point("half", "HalfEngine"))


def test_validate_engine_class_accepts_a_complete_engine():
    assert validate_engine_class(GoodEngine, "good", "here") == []


def test_the_installed_entry_point_loads_postgres():
    loaded = load_engines()
    assert "postgres" in loaded
    postgres = loaded["postgres"]
    assert postgres.target == "multiproxy_engines.postgres:PostgresEngine"
    assert postgres.engine.default_port == 5432
    assert postgres.distribution == "multiproxy"


def test_the_builtin_engine_passes_validation_like_any_plugin():
    from multiproxy_engines.postgres import PostgresEngine
    assert validate_engine_class(PostgresEngine, "postgres", "built-in") == []
