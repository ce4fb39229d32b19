"""[proxy] relay = "compiled" with the client timeouts on: idle_client_timeout closes a client idle in a relay lane
and spares one the relay keeps busy, query_timeout cancels a request the relay serves; more clients than backends."""
from __future__ import annotations

import threading
import time

import psycopg
import pytest

from .helpers import metric, metrics_text
from .test_pg_compiled_relay import compiled_config, lane_metrics, simple_query
from .test_pg_pooling import psycopg_connect


def timeouts_config(pg, max_size: int, proxy: dict | None = None, pool: dict | None = None) -> dict:
    config = compiled_config(pg, max_size=max_size)
    config["proxy"].update(proxy or {})
    config["clusters"]["main"]["pool"].update(pool or {})
    return config


@pytest.mark.timeout(90)
def test_idle_client_timeout_closes_an_idle_lane_client_and_spares_busy_ones(pg, proxy_factory):
    proxy = proxy_factory(timeouts_config(pg, max_size=2, proxy={"idle_client_timeout": 1.0}))
    busy_clients, errors, stop = 4, [], threading.Event()
    served = [0] * busy_clients

    def busy(number: int) -> None:
        # a statement every 0.2 s for 3 s, each served by the relay: never idle for the limit
        try:
            with psycopg_connect(proxy, autocommit=True) as conn:
                while not stop.is_set():
                    assert simple_query(conn, f"SELECT {number}") == [(number,)]
                    served[number] += 1
                    time.sleep(0.2)
        except Exception as exc:  # collected, re-raised in the test's thread
            errors.append(exc)

    with psycopg_connect(proxy, autocommit=True) as idle:
        assert simple_query(idle, "SELECT 7") == [(7,)]
        before = lane_metrics(proxy)["transactions_total"] or 0
        threads = [threading.Thread(target=busy, args=(i,)) for i in range(busy_clients)]
        for thread in threads:
            thread.start()
        time.sleep(3.0)
        stop.set()
        for thread in threads:
            thread.join(30)
        assert not errors, errors[:3]
        assert min(served) >= 8, served
        lanes = lane_metrics(proxy)
        # the busy clients' statements ran in the relay (not one trip through Python each)
        assert lanes["transactions_total"] - before >= sum(served) * 0.8, (lanes, served)
        # the idle client was told why and closed
        with pytest.raises(psycopg.OperationalError) as info:
            simple_query(idle, "SELECT 1")
        assert "idle_client_timeout" in str(info.value)
    assert metric(metrics_text(proxy), "multiproxy_client_idle_timeouts_total") == 1
    with psycopg_connect(proxy, autocommit=True) as conn:       # the pool serves on
        assert simple_query(conn, "SELECT 42") == [(42,)]


@pytest.mark.timeout(90)
def test_query_timeout_cancels_a_request_the_relay_serves(pg, proxy_factory):
    proxy = proxy_factory(timeouts_config(pg, max_size=1, pool={"query_timeout": 1.0}))
    with psycopg_connect(proxy, autocommit=True) as other, psycopg_connect(proxy, autocommit=True) as conn:
        assert simple_query(conn, "SELECT 1") == [(1,)]
        assert simple_query(other, "SELECT 2") == [(2,)]
        before = lane_metrics(proxy)["transactions_total"] or 0
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            simple_query(conn, "SELECT pg_sleep(10)")
        assert time.monotonic() - started < 3.0
        lanes = lane_metrics(proxy)
        assert lanes["transactions_total"] - before >= 1, lanes     # it ran in the relay
        # the connection and the single backend serve on, for both clients
        assert simple_query(conn, "SELECT 41 + 1") == [(42,)]
        assert simple_query(other, "SELECT pg_sleep(0.2), 3") == [("", 3)]   # a short request is left alone
    text = metrics_text(proxy)
    assert metric(text, "multiproxy_query_timeouts_total") == 1
    assert not metric(text, "multiproxy_client_idle_timeouts_total")
