"""Session pinning through the proxy: each pin reason keeps its session state across transactions, shows in
/metrics while the client is connected, and the backend is reset (DISCARD ALL) when the client leaves;
SET LOCAL and tracked parameters (application_name) do not pin."""
from __future__ import annotations

import dataclasses
import re
import threading
import time
import urllib.request
from typing import Callable

import psycopg
import pytest

from .pgserver import AUTH_DB
from .helpers import metric, metrics_text
from .proxy import free_port

USER = "mp_trust"
CONNECT_TIMEOUT = 10
ROUNDS = 6


# -- helpers ---------------------------------------------------------------------------------------

def proxy_config(pg, max_size: int = 2, borrow_timeout: float = 10.0) -> dict:
    return {
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "info"},
        "clusters": {"main": {"engine": "postgres", "hosts": [f"127.0.0.1:{pg.port}"], "backend": {"tls": "disable"},
                              "pool": {"mode": "transaction", "max_size": max_size,
                                       "borrow_timeout": borrow_timeout}}},
        "listeners": [{"name": "pg", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "role": "writer",
                       "auth": "trust"}],
    }


PINNED = "multiproxy_database_connections_currently_session_pinned"


def pinned(proxy, reason: str | None = None) -> float:
    labels = {"reason": reason} if reason else {}
    return metric(metrics_text(proxy), PINNED, **labels) or 0.0


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def connect(proxy, user: str = USER, **kwargs) -> psycopg.Connection:
    kwargs.setdefault("autocommit", True)
    # No automatic server-side prepares: only the statements under test may pin.
    return psycopg.connect(host=proxy.host, port=proxy.port, user=user, dbname=AUTH_DB,
                           connect_timeout=CONNECT_TIMEOUT, prepare_threshold=None, **kwargs)


def direct_connect(pg) -> psycopg.Connection:
    return psycopg.connect(host=pg.host, port=pg.port, user="postgres", dbname=AUTH_DB, autocommit=True,
                           connect_timeout=CONNECT_TIMEOUT)


def one(conn, sql: str, params=None):
    return conn.execute(sql, params).fetchone()[0]


# -- the pin reasons -------------------------------------------------------------------------------

@dataclasses.dataclass
class PinCase:
    reason: str                                        # the label in /metrics
    setup: Callable                                    # (conn, admin) -> None: the statements that pin
    check: Callable                                    # (conn, admin, round) -> None: the state still applies
    absent: Callable                                   # (conn, admin) -> None: a fresh client does not see it
    user: str = USER


def _sp_setup(conn, admin):
    # A plain SET is tracked and replayed, a computed value read back (no pin); a set_config inside a DO block
    # still pins (its body is not analysed as statements that run now).
    conn.execute("DO $$ BEGIN PERFORM set_config('search_path', 'pin_sp' || ', public', false); END $$")


def _sp_check(conn, admin, r):
    assert one(conn, "SELECT current_setting('search_path')") == "pin_sp, public"
    assert one(conn, "SELECT marker FROM sp_only") == "found through search_path"


def _sp_absent(conn, admin):
    assert one(conn, "SELECT current_setting('search_path')") == '"$user", public'
    with pytest.raises(psycopg.errors.UndefinedTable):
        with conn.transaction():
            conn.execute("SELECT marker FROM sp_only")


def _sc_setup(conn, admin):
    # A scope only the server computes (is_local not a literal) still pins.
    assert one(conn, "SELECT set_config('mp.tenant', (40 + 2)::text, 1 = 0)") == "42"


def _sc_check(conn, admin, r):
    assert one(conn, "SELECT current_setting('mp.tenant')") == "42"


def _sc_absent(conn, admin):
    # A placeholder variable a session once set stays defined but is reset to '' (fresh backends: NULL).
    assert one(conn, "SELECT current_setting('mp.tenant', true)") in (None, "")


def _tt_setup(conn, admin):
    conn.execute("CREATE TEMP TABLE pin_tmp (round int)")


def _tt_check(conn, admin, r):
    with conn.transaction():
        conn.execute("INSERT INTO pin_tmp VALUES (%s)", (r,))
    assert conn.execute("SELECT count(*), sum(round) FROM pin_tmp").fetchone() == (r + 1, sum(range(r + 1)))


def _tt_absent(conn, admin):
    assert one(conn, "SELECT to_regclass('pin_tmp')") is None
    assert one(admin, "SELECT count(*) FROM pg_class WHERE relname = 'pin_tmp'") == 0


def _listen_setup(conn, admin):
    conn.execute("LISTEN pin_chan")


def _listen_check(conn, admin, r):
    assert one(conn, "SELECT array_agg(c) FROM pg_listening_channels() c") == ["pin_chan"]
    admin.execute("SELECT pg_notify('pin_chan', %s)", (f"round {r}",))
    got = [n.payload for n in conn.notifies(timeout=5, stop_after=1)]
    assert got == [f"round {r}"]


def _listen_absent(conn, admin):
    assert one(conn, "SELECT count(*) FROM pg_listening_channels()") == 0


def _hold_setup(conn, admin):
    with conn.transaction():
        conn.execute("DECLARE pin_cur CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 100) g")


def _hold_check(conn, admin, r):
    with conn.transaction():
        assert conn.execute("FETCH 2 FROM pin_cur").fetchall() == [(2 * r + 1,), (2 * r + 2,)]


def _hold_absent(conn, admin):
    assert one(conn, "SELECT count(*) FROM pg_cursors") == 0


def _prepare_setup(conn, admin):
    conn.execute("PREPARE pin_double(int) AS SELECT $1 * 2")


def _prepare_check(conn, admin, r):
    assert one(conn, f"EXECUTE pin_double({r + 10})") == 2 * (r + 10)
    assert one(conn, "SELECT count(*) FROM pg_prepared_statements WHERE name = 'pin_double'") == 1


def _prepare_absent(conn, admin):
    assert one(conn, "SELECT count(*) FROM pg_prepared_statements") == 0


ADVISORY_KEY = 424242


def _lock_setup(conn, admin):
    conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_KEY,))


def _lock_check(conn, admin, r):
    assert one(conn, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s "
                     "AND pid = pg_backend_pid() AND granted", (ADVISORY_KEY,)) == 1
    assert one(admin, "SELECT pg_try_advisory_lock(%s)", (ADVISORY_KEY,)) is False


def _lock_absent(conn, admin):
    assert one(admin, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s",
               (ADVISORY_KEY,)) == 0


def _load_setup(conn, admin):
    conn.execute("LOAD 'auto_explain'")


def _load_check(conn, admin, r):
    # The library's settings exist only in a backend that loaded it.
    assert one(conn, "SELECT current_setting('auto_explain.log_min_duration', true)") == "-1"


def _load_absent(conn, admin):
    pass  # DISCARD ALL does not unload a library; the reset itself is checked through pg_stat_activity


CASES = [
    PinCase("session_variable", _sp_setup, _sp_check, _sp_absent),
    PinCase("session_variable", _sc_setup, _sc_check, _sc_absent),
    PinCase("temp_table", _tt_setup, _tt_check, _tt_absent),
    PinCase("listen", _listen_setup, _listen_check, _listen_absent),
    PinCase("cursor_with_hold", _hold_setup, _hold_check, _hold_absent),
    PinCase("sql_prepare", _prepare_setup, _prepare_check, _prepare_absent),
    PinCase("advisory_lock", _lock_setup, _lock_check, _lock_absent),
    PinCase("load", _load_setup, _load_check, _load_absent, user="postgres"),
]
CASE_IDS = ["search_path", "set_config", "temp_table", "listen", "with_hold", "sql_prepare", "advisory_lock", "load"]


@pytest.fixture(scope="module")
def pin_schema(pg):
    with direct_connect(pg) as admin:
        admin.execute("CREATE SCHEMA IF NOT EXISTS pin_sp AUTHORIZATION mp_trust")
        admin.execute("CREATE TABLE IF NOT EXISTS pin_sp.sp_only (marker text)")
        admin.execute("TRUNCATE pin_sp.sp_only")
        admin.execute("INSERT INTO pin_sp.sp_only VALUES ('found through search_path')")
        admin.execute("GRANT ALL ON pin_sp.sp_only TO mp_trust")
    return "pin_sp"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_pin_reason(pg, proxy_factory, pin_schema, case):
    if case.reason == "load":
        with direct_connect(pg) as probe:
            try:
                probe.execute("LOAD 'auto_explain'")
            except psycopg.Error as exc:
                pytest.skip(f"auto_explain is not loadable here: {exc}")
    proxy = proxy_factory(proxy_config(pg, max_size=2))
    with direct_connect(pg) as admin:
        client = connect(proxy, user=case.user)
        try:
            assert pinned(proxy) == 0
            case.setup(client, admin)
            pid = one(client, "SELECT pg_backend_pid()")
            assert pinned(proxy, case.reason) == 1
            assert pinned(proxy) == 1  # this reason only

            # Other clients keep running on the other backend meanwhile; never on the pinned one.
            others: dict = {"pids": set(), "errors": []}

            def churn():
                try:
                    with connect(proxy, user=case.user) as other:
                        for i in range(30):
                            with other.transaction():
                                others["pids"].add(one(other, "SELECT pg_backend_pid()"))
                                assert one(other, "SELECT %s::int * 3", (i,)) == i * 3
                except Exception as exc:  # noqa: BLE001
                    others["errors"].append(repr(exc))

            worker = threading.Thread(target=churn, daemon=True)
            worker.start()
            for r in range(ROUNDS):
                case.check(client, admin, r)
                if r % 2:
                    with client.transaction():
                        assert one(client, "SELECT pg_backend_pid()") == pid
                else:
                    assert one(client, "SELECT pg_backend_pid()") == pid
            worker.join(30)
            assert not worker.is_alive()
            assert others["errors"] == []
            assert others["pids"] and pid not in others["pids"]
            assert pinned(proxy, case.reason) == 1
        finally:
            client.close()

        # Disconnected: no longer pinned, and its backend was reset and went back to the pool.
        assert wait_for(lambda: pinned(proxy, case.reason) == 0, 10), metrics_text(proxy)
        assert wait_for(lambda: one(admin, "SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,))
                        == "DISCARD ALL", 10), proxy.log_tail()
        assert wait_for(lambda: metric(metrics_text(proxy), "multiproxy_database_connections_currently_borrowed")
                        == 0, 10)

        # Two new clients in open transactions hold both backends at once: neither sees the old state.
        fresh = [connect(proxy, user=case.user, autocommit=False) for _ in range(2)]
        try:
            pids = set()
            for conn in fresh:
                pids.add(one(conn, "SELECT pg_backend_pid()"))
                case.absent(conn, admin)
            assert pid in pids and len(pids) == 2
            for conn in fresh:
                conn.commit()
        finally:
            for conn in fresh:
                conn.close()
        assert pinned(proxy) == 0


# -- what does not pin -----------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_set_local_does_not_pin(pg, proxy_factory):
    proxy = proxy_factory(proxy_config(pg, max_size=2))
    with connect(proxy, autocommit=False) as conn:
        for r in range(5):
            conn.execute("SET LOCAL statement_timeout = '7s'")
            conn.execute("SET LOCAL search_path = pin_local, public")
            assert one(conn, "SELECT current_setting('statement_timeout')") == "7s"
            assert one(conn, "SELECT current_setting('search_path')") == "pin_local, public"
            conn.commit()
            assert one(conn, "SELECT current_setting('statement_timeout')") == "0"
            assert one(conn, "SELECT current_setting('search_path')") == '"$user", public'
            conn.commit()
            # set_config(..., true) is the function form of SET LOCAL.
            assert one(conn, "SELECT set_config('statement_timeout', '9s', true)") == "9s"
            conn.commit()
            assert one(conn, "SELECT current_setting('statement_timeout')") == "0"
            conn.commit()
            text = metrics_text(proxy)
            assert not metric(text, PINNED)
            assert not metric(text, "multiproxy_pin_reasons_detected_total")
            # Not pinned: between transactions the client holds no backend.
            assert metric(text, "multiproxy_database_connections_currently_borrowed") == 0


@pytest.mark.timeout(60)
def test_application_name_does_not_pin_and_follows_the_client(pg, proxy_factory):
    proxy = proxy_factory(proxy_config(pg, max_size=2))
    client = connect(proxy)
    blocker = connect(proxy, autocommit=False)
    # (a SET LOCAL right after its BEGIN: in the compiled relay mode the blocker stops there and borrows from the pool
    # as on the Python path, where a transaction run in its lane would keep it on the backend its lane holds)
    try:
        client.execute("SET application_name = 'appx'")
        assert client.info.parameter_status("application_name") == "appx"
        pids = []
        for r in range(8):
            if r % 2:
                # The blocker takes the backend the client used last (the pool is LIFO): the client moves.
                blocker.execute("SET LOCAL lock_timeout = '5s'")
                blocker.execute("SELECT 1")
            pid, app = client.execute("SELECT pg_backend_pid(), current_setting('application_name')").fetchone()
            pids.append(pid)
            assert app == "appx", f"round {r} on backend {pid}"
            assert client.info.parameter_status("application_name") == "appx"
            blocker.commit()
        assert len(set(pids)) == 2, pids  # it really ran on both backends
        text = metrics_text(proxy)
        assert not metric(text, PINNED)
        assert not metric(text, "multiproxy_pin_reasons_detected_total")
    finally:
        client.close()
        blocker.close()
    # A client that never set application_name sees its own (empty) value on both backends.
    fresh = [connect(proxy, autocommit=False) for _ in range(2)]
    try:
        seen = set()
        for conn in fresh:
            pid, app = conn.execute("SELECT pg_backend_pid(), current_setting('application_name')").fetchone()
            seen.add(pid)
            assert app == ""
        assert seen == set(pids)
        for conn in fresh:
            conn.commit()
    finally:
        for conn in fresh:
            conn.close()
