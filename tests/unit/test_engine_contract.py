"""The plugin contract test kit run over every engine found through the multiproxy.engines entry point."""
import pytest

from multiproxy.contract import check_engine
from multiproxy.engine import Engine
from multiproxy.plugins import load_engines

ENGINES = load_engines()


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_engine_meets_the_contract(name):
    assert check_engine(ENGINES[name].engine) == []


def test_builtin_engines_load_through_the_entry_point():
    assert "postgres" in ENGINES
    assert ENGINES["postgres"].target == "multiproxy_engines.postgres:PostgresEngine"
    assert ENGINES["postgres"].distribution == "multiproxy"


def test_the_kit_reports_a_broken_engine():
    class Broken(Engine):
        name = "broken"
        default_port = 1

        def render_error(self, kind, message):
            return b""

        def client_protocol(self, ctx):
            return object()

    problems = check_engine(Broken())
    assert any("render_error" in p for p in problems)
    assert any("ClientProtocol" in p for p in problems)
    assert all(p.startswith("engine 'broken'") for p in problems)
