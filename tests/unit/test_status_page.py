"""The status page without sockets: its sections, escaping, redaction, size, the sampler's ring and percentiles, and
what the admin server answers at / and /status.json."""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from multiproxy import status_page
from multiproxy.admin import Console
from multiproxy.auth import UsersFile
from multiproxy.proxy import Sessions
from multiproxy.config import build_config
from multiproxy.metrics import Metrics, admin_http_refusal
from multiproxy.pinning import PinPolicy

pytestmark = pytest.mark.timeout(30)

CONFIG = {
    "clusters": {"main": {"engine": "postgres", "hosts": ["127.0.0.1:5432"],
                          "credentials": [{"user": "app", "password": "hunter2-secret"}]}},
    "listeners": [{"name": "pg", "listen": "127.0.0.1:6432", "cluster": "main", "auth": "trust"}],
}


def data(**overrides) -> dict:
    """A page's data with a followed cluster, one pool with samples, a pinned session and a writer change."""
    base = {
        "time": 1_800_000_000.0, "uptime_seconds": 75.0, "worker": 0, "workers": 1, "read_only_retries": 2,
        "window_seconds": 300,
        "clusters": [{"name": "pg", "engine": "postgres", "writer": "127.0.0.3:5432", "followed": True,
                      "endpoints": [{"kind": "writer", "name": "writer.pg.lab", "addresses": ["127.0.0.3"], "error": ""}],
                      "nodes": [{"address": "127.0.0.2:5432", "role": None, "healthy": False, "lag": None,
                                 "serving": [], "skipped": "down: connection refused", "error": "connection refused",
                                 "sources": ["writer-endpoint"]},
                                {"address": "127.0.0.3:5432", "role": "writer", "healthy": True, "lag": 0.0,
                                 "serving": ["writer"], "skipped": None, "error": "", "sources": ["reader-endpoint"]}]}],
        "listeners": [{"name": "pg-writer", "engine": "postgres", "listen": "127.0.0.1:6432", "cluster": "pg",
                       "role": "writer", "clients": 3, "series": [(1.0, 1), (2.0, 3)]}],
        "pools": [{"pool": "pg/writer/lab/lab", "cluster": "pg", "role": "writer", "user": "lab", "database": "lab",
                   "clients": 3, "size": 1, "idle": 0, "borrowed": 1, "waiting": 1, "max_size": 10,
                   "longest_wait": 0.25, "borrow_wait": {"borrows": 10, "waited": 1, "p50": 0.0, "p95": 0.2,
                                                         "p99": 0.2, "max": 0.2},
                   "series": [(1.0, 1, 1, 0, 0), (2.0, 3, 1, 1, 1)]}],
        "pins": {"by_cluster": {"pg": {"now": {"temp_table": 1}, "detected_total": {"temp_table": 4}}},
                 "sessions": [{"addr": "127.0.0.1", "port": 40000, "user": "lab", "database": "lab",
                               "listener": "pg-writer", "cluster": "pg", "engine": "postgres",
                               "reason": "temp_table", "statement": "CREATE TEMP TABLE t (a int)",
                               "since": "2027-01-15 08:00:00 UTC"}]},
        "timeline": [{"time": 1_800_000_000.0, "cluster": "pg", "event": "writer", "old": "127.0.0.2:5432",
                      "new": "127.0.0.3:5432", "reason": "probe", "outage_seconds": 1.5},
                     {"time": 1_800_000_001.0, "cluster": "pg", "event": "drain", "old": "127.0.0.2:5432",
                      "new": "127.0.0.3:5432", "pools": 1}],
    }
    base.update(overrides)
    return base


def test_the_page_has_every_section_and_is_one_small_document():
    page = status_page.render_page(data())
    for ident in ("clusters", "pools", "pins", "timeline"):
        assert f'id="{ident}-section"' in page and f'id="{ident}"' in page
    assert '<noscript><meta http-equiv="refresh" content="5"></noscript>' in page
    assert "<script>" in page and "<style>" in page and "<svg" in page
    # no external assets: nothing is loaded from anywhere
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "@import" not in page and "url(" not in page
    assert len(page.encode()) < 40_000


def test_sections_show_the_writer_nodes_pools_pins_and_the_writer_change():
    s = status_page.render_sections(data())
    assert 'data-writer="127.0.0.3:5432"' in s["clusters"] and "verified by probe" in s["clusters"]
    assert 'class="down"' in s["clusters"] and "down: connection refused" in s["clusters"]
    assert "writer.pg.lab" in s["clusters"]
    assert 'data-pool="pg/writer/lab/lab"' in s["pools"] and "<polyline" in s["pools"]
    assert "0.0 ms / 200.0 ms / 200.0 ms" in s["pools"]
    assert 'data-reason="temp_table"' in s["pins"] and "CREATE TEMP TABLE t (a int)" in s["pins"]
    assert "writer 127.0.0.2:5432 → 127.0.0.3:5432 (probe), 1.5 s without a writer" in s["timeline"]
    assert s["timeline"].index('data-event="drain"') < s["timeline"].index('data-event="writer"')  # newest first
    assert "one process" in s["header"]


def test_values_are_escaped():
    evil = '<script>alert("x")</script>'
    d = data()
    d["pins"]["sessions"][0]["statement"] = f"SELECT '{evil}'"
    d["pools"][0]["pool"] = evil
    d["clusters"][0]["nodes"][0]["skipped"] = evil
    page = status_page.render_page(d)
    assert evil not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page


def test_password_literals_in_statements_are_redacted():
    d = data()
    d["pins"]["sessions"][0]["statement"] = "CREATE TEMP TABLE t AS SELECT 1; ALTER USER x PASSWORD 'sesame-42'"
    d["timeline"].append({"time": 1.0, "cluster": "pg", "event": "node", "node": "a:1", "state": "down",
                          "error": "login failed: password=sesame-42"})
    page = status_page.render_page(d)
    assert "sesame-42" not in page and "PASSWORD ***" in page
    assert status_page.redact("CREATE USER u IDENTIFIED BY 'pw'") == "CREATE USER u IDENTIFIED BY ***"
    assert status_page.redact("CREATE LOGIN x WITH PASSWORD = 'y', CHECK_POLICY = OFF") == \
        "CREATE LOGIN x WITH PASSWORD = ***, CHECK_POLICY = OFF"
    assert status_page.redact("ALTER USER u IDENTIFIED WITH caching_sha2_password BY 'x'").endswith("BY ***")
    # prose about passwords stays readable
    assert status_page.redact('password authentication failed for user "lab"') == \
        'password authentication failed for user "lab"'


def test_with_workers_the_page_says_it_shows_one_worker():
    s = status_page.render_sections(data(workers=4))
    assert "worker 0 of 4" in s["header"] and "of this worker only" in s["header"]


def test_empty_state_renders():
    d = data(clusters=[], pools=[], listeners=[], timeline=[], pins={"by_cluster": {}, "sessions": []})
    s = status_page.render_sections(d)
    assert "no pools yet" in s["pools"] and "no session is pinned now" in s["pins"]
    assert "no failover events yet" in s["timeline"]


class FakePool:
    def __init__(self, label):
        self.label = label
        self.size, self.idle, self.borrowed, self.waiters = 0, {}, 0, []
        self.borrows_total = self.waited_borrows_total = 0
        self.borrow_wait_seconds_total = 0.0

    @property
    def idle_count(self):
        return len(self.idle)

    @property
    def waiting_count(self):
        return len(self.waiters)


def test_sampler_keeps_a_bounded_ring_and_approximates_borrow_percentiles():
    pool = FakePool("p")
    proxy = SimpleNamespace(sessions=Sessions(), pools={"k": pool}, listeners=[], stopping=False)
    sampler = status_page.Sampler(proxy, keep=5)
    for second in range(8):
        pool.size = second
        if second >= 4:     # from now on 10 borrows a second, one of which waits 0.5 s
            pool.borrows_total += 10
            pool.waited_borrows_total += 1
            pool.borrow_wait_seconds_total += 0.5
        sampler.sample(now=float(second))
    assert len(sampler.samples) == 5
    assert [s[2] for s in sampler.series("p")] == [3, 4, 5, 6, 7]
    waits = sampler.borrow_waits("p")
    assert waits["borrows"] == 40 and waits["waited"] == 4
    assert waits["p50"] == 0.0 and waits["p95"] == 0.5 and waits["max"] == 0.5
    assert status_page.Sampler(proxy).borrow_waits("p") == {"borrows": 0}


def test_chart_is_svg_scaled_to_its_largest_value():
    svg = status_page.chart([(0.0, 1, 4), (1.0, 2, 8)], [(1, "c", "clients"), (2, "b", "backends")], "t")
    assert svg.startswith("<svg") and svg.count("<polyline") == 2 and "max 8" in svg
    assert "collecting samples" in status_page.chart([(0.0, 1)], [(1, "c", "x")], "t")


class IdleProxy:
    """What the page reads of a proxy with no clients and no pools (static cluster, no registry)."""

    def __init__(self, config=CONFIG):
        self.config = build_config(config)
        self.pools, self.sessions, self.handshaking = {}, Sessions(), {}
        self.registry = None
        self.listeners = []
        self.users = UsersFile.empty()
        self.pin_policies = {name: PinPolicy(c.pinning, name) for name, c in self.config.clusters.items()}
        self.started = 0.0
        self.stopping = False
        self.worker = 0
        self.metrics = Metrics(self)
        self.console = Console(self)


def test_collect_on_an_idle_proxy_shows_the_static_cluster_and_no_secret():
    proxy = IdleProxy()
    proxy.console.record("drain", cluster="main", old="127.0.0.1:5432", new=None, pools=0)
    proxy.console.record("pause", database="x")   # not a failover event
    d = status_page.collect(proxy, None)
    assert d["clusters"][0]["writer"] == "127.0.0.1:5432" and not d["clusters"][0]["followed"]
    assert [e["event"] for e in d["timeline"]] == ["drain"]
    page = status_page.render_page(d)
    body = json.dumps({"sections": status_page.render_sections(d), "data": d}, default=str)
    assert "static: the first host" in page
    for text in (page, body):
        assert "hunter2-secret" not in text


def call(page, path, refusal="", token=False):
    answer = {}

    def start_response(status, headers):
        answer["status"], answer["headers"] = status, dict(headers)
    body = b"".join(page.respond(path, start_response, refusal, token))
    return answer["status"], answer["headers"], body


def test_http_answers_html_json_and_refusals():
    proxy = IdleProxy()
    page = status_page.StatusPage(proxy)
    try:
        status, headers, body = call(page, "/")
        assert status == "200 OK" and headers["Content-Type"].startswith("text/html")
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert b'id="clusters-section"' in body
        status, headers, body = call(page, "/status.json")
        assert status == "200 OK" and set(json.loads(body)["sections"]) == {"header", "clusters", "pools", "pins",
                                                                           "timeline"}
        status, headers, body = call(page, "/", refusal="needs the token", token=True)
        assert status == "401 Unauthorized" and headers["WWW-Authenticate"].startswith("Basic")
        assert call(page, "/", refusal="loopback only")[0] == "403 Forbidden"
    finally:
        proxy.stopping = True
        page.sampler.stop()


def test_basic_auth_carries_the_token_as_its_password(monkeypatch):
    import base64
    proxy = SimpleNamespace(config=build_config({**CONFIG, "admin": {"http_token_env": "MP_TEST_TOKEN"}}))
    monkeypatch.setenv("MP_TEST_TOKEN", "t0ken")
    good = "Basic " + base64.b64encode(b"anyone:t0ken").decode()
    bad = "Basic " + base64.b64encode(b"anyone:wrong").decode()
    assert admin_http_refusal(proxy, good, loopback=False) == ""
    assert "needs the admin token" in admin_http_refusal(proxy, bad, loopback=False)
    assert "needs the admin token" in admin_http_refusal(proxy, "Basic !!!", loopback=False)


class NamedPool(FakePool):
    def __init__(self, label, max_size=5):
        super().__init__(label)
        self.cluster = SimpleNamespace(name="main")
        self.role, self.user, self.database = "writer", "app", "db"
        self.config = SimpleNamespace(max_size=max_size)
        self.waiting_since = {}


def test_workers_report_to_worker_zero_whose_page_sums_them():
    import gevent
    import os
    group = os.getpid() * 1000 + 7     # a group name of this test's own
    zero = IdleProxy()
    zero.worker, zero.worker_count, zero.cancel_group = 0, 2, group
    zero.pools = {"k": NamedPool("main/writer/app/db")}
    zero.pools["k"].size = 2
    one = IdleProxy()
    one.worker, one.worker_count, one.cancel_group = 1, 2, group
    one.pools = {"k": NamedPool("main/writer/app/db"), "r": NamedPool("main/reader/app/db")}
    one.pools["k"].size, one.pools["r"].size = 3, 1
    one.pin_policies["main"].pinned_now["temp_table"] = 2
    receiving, sending = status_page.Sampler(zero), status_page.Sampler(one)
    receiving.start()
    sending.start()
    try:
        deadline = 50
        while not receiving.fresh_peers() and deadline:
            gevent.sleep(0.05)
            deadline -= 1
        assert receiving.fresh_peers(), "worker 1's report did not arrive"
        receiving.sample()
        d = status_page.collect(zero, receiving)
        sizes = {p["pool"]: (p["size"], p["max_size"]) for p in d["pools"]}
        # max_size holds for the group (the supervisor's budget broker): not summed over the workers
        assert sizes == {"main/writer/app/db": (5, 5), "main/reader/app/db": (1, 5)}
        assert receiving.series("main/writer/app/db")[-1][2] == 5
        assert d["pins"]["by_cluster"]["main"]["now"] == {"temp_table": 2}
        header = status_page.render_sections(d)["header"]
        assert "2 of 2 workers" in header and "summed" in header
    finally:
        zero.stopping = one.stopping = True
        receiving.stop()
        sending.stop()


def test_a_full_window_of_many_pools_stays_small():
    d = data()
    series = [(float(t), t % 7, t % 3, t % 2, t % 5) for t in range(status_page.SAMPLES)]
    d["pools"] = [{**d["pools"][0], "pool": f"c/writer/user{n}/db", "series": series} for n in range(40)]
    d["listeners"] = [{**d["listeners"][0], "name": f"l{n}", "series": [(t, c) for t, c, *_ in series]}
                      for n in range(4)]
    page = status_page.render_page(d)
    assert page.count("<figure>") == status_page.CHART_POOLS
    assert len(page.encode()) < 50_000
    # the spike of one sample survives the merge into buckets
    spiky = [(float(t), 1) for t in range(status_page.SAMPLES)]
    spiky[150] = (150.0, 50)
    assert "max 50" in status_page.chart(spiky, [(1, "c", "clients")], "t")
