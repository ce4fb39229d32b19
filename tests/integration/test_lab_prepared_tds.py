"""Lab acceptance for prepared statements on TDS: through the lab's TDS writer listener (pool max_size 10), tedious
prepare()/execute() with 20 connections x 10 executes, and SQLAlchemy mssql+pymssql with more sessions than
backends: zero pool timeouts, zero prepared_statement pins (deltas of the shared lab's metrics)."""
from __future__ import annotations

import threading

import pytest

from .helpers import metric
from .tdskit import tedious_prepared

pytestmark = pytest.mark.tds
TIMEOUTS = "multiproxy_database_connection_borrow_timeouts_total"
PINS = "multiproxy_pin_reasons_detected_total"
STATEMENTS = "multiproxy_prepared_statements_total"


def tally(shared_lab) -> dict:
    text = shared_lab.metrics_text()
    return {"timeouts": metric(text, TIMEOUTS) or 0, "pins": metric(text, PINS, reason="prepared_statement") or 0,
            "executes": (metric(text, STATEMENTS, outcome="hit") or 0) + (metric(text, STATEMENTS, outcome="miss")
                                                                          or 0)}


@pytest.mark.timeout(300)
def test_tedious_prepared_through_the_lab(shared_lab):
    args = shared_lab.args("MULTIPROXY_TDS_URL")
    before = tally(shared_lab)
    summary = tedious_prepared(args["host"], args["port"], args["user"], args["password"], args["database"], 20, 10)
    assert summary["failures"] == 0, summary["errors"]
    assert summary["ok"] == 200
    after = tally(shared_lab)
    assert after["timeouts"] == before["timeouts"] and after["pins"] == before["pins"]
    assert after["executes"] - before["executes"] == 200


@pytest.mark.timeout(300)
def test_sqlalchemy_sessions_outnumber_the_lab_pool(shared_lab):
    sqlalchemy = pytest.importorskip("sqlalchemy")
    pytest.importorskip("pymssql")
    from sqlalchemy import inspect

    from .test_tds_sqlalchemy import Base, round_trip
    args = shared_lab.args("MULTIPROXY_TDS_URL")
    sessions = 16
    before = tally(shared_lab)
    engine = sqlalchemy.create_engine(
        f"mssql+pymssql://{args['user']}:{args['password']}@{args['host']}:{args['port']}/{args['database']}"
        "?tds_version=7.4", pool_size=sessions, max_overflow=0, pool_timeout=60)
    failures: list[str] = []
    barrier = threading.Barrier(sessions)

    def work(i: int) -> None:
        try:
            barrier.wait(60)
            for n in range(2):
                round_trip(engine, f"lab{i}-{n}")
        except Exception as exc:  # noqa: BLE001 - every failure is reported
            failures.append(f"session {i}: {exc!r}")

    try:
        Base.metadata.create_all(engine)
        threads = [threading.Thread(target=work, args=(i,)) for i in range(sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        assert failures == []
        assert engine.pool.checkedin() > 10
        Base.metadata.drop_all(engine)
        assert not inspect(engine).has_table("sa_authors")
    finally:
        engine.dispose()
    after = tally(shared_lab)
    assert after["timeouts"] == before["timeouts"] and after["pins"] == before["pins"]
