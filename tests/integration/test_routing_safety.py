"""No client can steer the registry (issue 11): read-only refusals a session caused stay its own, startup options
survive, reader listeners never write, lag means lag, and pools follow roles and lag. Real servers, real clients."""
import contextlib
import threading
import time

import psycopg
import pymssql
import pymysql
import pytest

from .helpers import admin_status, metric, metrics_text
from .test_failover_mysql import DB as MY_DB
from .test_failover_mysql import PRIMARY_IP as MY_PRIMARY
from .test_failover_mysql import connect as my_connect
from .test_failover_mysql import drill as my_drill  # noqa: F401  (fixture)
from .test_failover_mysql import drill_config as my_config
from .test_failover_pg import PRIMARY_IP, STANDBY_IP, wait_for
from .test_failover_pg import drill as pg_drill  # noqa: F401  (fixture)
from .test_failover_pg import drill_config as pg_config
from .test_failover_tds import OLD_IP as TDS_WRITER
from .test_failover_tds import connect as tds_connect
from .test_failover_tds import drill as tds_drill  # noqa: F401  (fixture)
from .test_failover_tds import drill_config as tds_config


def writer_of(proxy, cluster):
    return admin_status(proxy)["registry"][cluster]["writer"]


def node_status(proxy, cluster, ip):
    return next(n for n in admin_status(proxy)["registry"][cluster]["nodes"] if n["address"].startswith(ip + ":"))


def start_pg_proxy(drill, proxy_factory, **health):
    config = pg_config(drill)
    config["clusters"]["pg"]["health"].update(health)
    config["clusters"]["pg"]["pool"]["max_size"] = 2        # fewer backends than the test's clients
    proxy = proxy_factory(config)
    wait_for(lambda: writer_of(proxy, "pg") == f"{PRIMARY_IP}:{drill['port']}", 15,
             "the registry to verify the primary as writer", lambda: admin_status(proxy)["registry"])
    wait_for(lambda: node_status(proxy, "pg", STANDBY_IP)["skipped"] is None, 15, "the standby to serve reads",
             lambda: admin_status(proxy)["registry"])
    return proxy


def pg_conninfo(proxy, listener="w", **extra):
    host, port = proxy.address(listener)
    return dict(host=host, port=port, user="postgres", dbname="postgres", connect_timeout=10, **extra)


@contextlib.contextmanager
def standby_behind(proxy, drill, row_id):
    """Replay paused on the standby while the writer keeps writing, until the proxy skips it for its lag."""
    drill["standby"].psql("SELECT pg_wal_replay_pause()")
    try:
        with psycopg.connect(**pg_conninfo(proxy), autocommit=True) as writer:
            deadline = time.monotonic() + 20
            while node_status(proxy, "pg", STANDBY_IP)["skipped"] is None and time.monotonic() < deadline:
                writer.execute(f"INSERT INTO drill (id) VALUES ({row_id}) ON CONFLICT (id) DO UPDATE SET at = now()")
                time.sleep(0.3)
        # Beyond the bound, or unknown when the standby has replayed no transaction yet to date its delay by.
        assert node_status(proxy, "pg", STANDBY_IP)["skipped"] in ("replica lag unknown",) or \
            "beyond max_replica_lag" in (node_status(proxy, "pg", STANDBY_IP)["skipped"] or "")
        yield
    finally:
        drill["standby"].psql("SELECT pg_wal_replay_resume()")


@pytest.mark.timeout(180)
def test_pg_a_read_only_session_cannot_move_the_writer_and_keeps_its_setting(pg_drill, proxy_factory):
    proxy = start_pg_proxy(pg_drill, proxy_factory)
    changes = metric(metrics_text(proxy), "multiproxy_cluster_writer_changes_total", cluster="pg")
    other = psycopg.connect(**pg_conninfo(proxy))             # another client's open transaction
    other.execute("INSERT INTO drill (id) VALUES (100)")
    with psycopg.connect(**pg_conninfo(proxy), autocommit=True) as conn:
        conn.execute("SET default_transaction_read_only = on")
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO drill (id) VALUES (1)")
        # Many transactions later, on whatever backend, the session is still read-only.
        for _ in range(5):
            assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO drill (id) VALUES (2)")
        conn.execute("SET default_transaction_read_only = off")
        conn.execute("INSERT INTO drill (id) VALUES (3)")
    other.commit()                                             # not cancelled: no drain happened
    other.close()
    with psycopg.connect(**pg_conninfo(proxy), autocommit=True) as conn:   # nothing leaked to the next client
        assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("off",)
        assert conn.execute("SELECT array_agg(id ORDER BY id) FROM drill WHERE id IN (1, 2, 3, 100)").fetchone() \
            == ([3, 100],)
    text = metrics_text(proxy)
    assert metric(text, "multiproxy_cluster_writer_changes_total", cluster="pg") == changes
    assert metric(text, "multiproxy_read_only_retries_total") == 0
    assert writer_of(proxy, "pg") == f"{PRIMARY_IP}:{pg_drill['port']}"
    assert "no writer" not in proxy.log_text()


@pytest.mark.timeout(180)
def test_pg_a_refusal_the_session_did_not_ask_for_is_checked_with_a_probe_first(pg_drill, proxy_factory):
    # A role whose sessions default to read-only: the proxy cannot see why the writer refuses, so it probes the
    # node, which still answers as writer; the client gets the server's error and the writer stays.
    pg_drill["primary"].psql("CREATE ROLE ro_app LOGIN; GRANT ALL ON drill TO ro_app; "
                             "ALTER ROLE ro_app SET default_transaction_read_only = on")
    proxy = start_pg_proxy(pg_drill, proxy_factory, probe_interval=30.0)
    info = pg_conninfo(proxy)
    info["user"] = "ro_app"
    with psycopg.connect(**info, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO drill (id) VALUES (10)")
        assert conn.execute("SELECT 1").fetchone() == (1,)      # the connection is fine
    status = admin_status(proxy)["registry"]["pg"]
    assert status["writer"] == f"{PRIMARY_IP}:{pg_drill['port']}"
    assert status["read_only_checks"] == {"total": 1, "not_writer": 0}
    assert metric(metrics_text(proxy), "multiproxy_read_only_retries_total") == 0
    assert pg_drill["primary"].psql("SELECT count(*) FROM drill WHERE id = 10") == "0"


@pytest.mark.timeout(180)
def test_pg_startup_options_are_replayed_or_refused(pg_drill, proxy_factory):
    proxy = start_pg_proxy(pg_drill, proxy_factory)
    options = "-c default_transaction_read_only=on -c statement_timeout=4321"
    conns = [psycopg.connect(**pg_conninfo(proxy, options=options), autocommit=True) for _ in range(3)]
    plain = [psycopg.connect(**pg_conninfo(proxy), autocommit=True) for _ in range(3)]
    for _ in range(3):                                          # 6 clients over 2 backends, interleaved
        for conn in conns:
            assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
            assert conn.execute("SHOW statement_timeout").fetchone() == ("4321ms",)
        for conn in plain:
            assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("off",)
            assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        conns[0].execute("INSERT INTO drill (id) VALUES (20)")
    for conn in conns + plain:
        conn.close()
    with pytest.raises(psycopg.OperationalError, match="startup option '-e'"):
        psycopg.connect(**pg_conninfo(proxy, options="-e"))
    assert writer_of(proxy, "pg") == f"{PRIMARY_IP}:{pg_drill['port']}"


@pytest.mark.timeout(180)
def test_pg_reader_listener_never_writes(pg_drill, proxy_factory):
    proxy = start_pg_proxy(pg_drill, proxy_factory, max_replica_lag=1.0)
    with psycopg.connect(**pg_conninfo(proxy, "r"), autocommit=True) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO drill (id) VALUES (30)")
    # With no reader left (the standby lags beyond the bound) the reader listener falls back to the writer, and
    # its sessions are read-only there too.
    with standby_behind(proxy, pg_drill, -2):
        with psycopg.connect(**pg_conninfo(proxy, "r"), autocommit=True) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute("INSERT INTO drill (id) VALUES (31)")
    assert pg_drill["primary"].psql("SELECT count(*) FROM drill WHERE id IN (30, 31)") == "0"
    text = metrics_text(proxy)
    assert metric(text, "multiproxy_read_only_retries_total") == 0
    assert writer_of(proxy, "pg") == f"{PRIMARY_IP}:{pg_drill['port']}"


@pytest.mark.timeout(180)
def test_pg_lag_means_lag_and_pooled_reader_connections_follow_it(pg_drill, proxy_factory):
    proxy = start_pg_proxy(pg_drill, proxy_factory, max_replica_lag=1.0)
    with psycopg.connect(**pg_conninfo(proxy), autocommit=True) as writer:
        writer.execute("INSERT INTO drill (id) VALUES (40)")
    reader = psycopg.connect(**pg_conninfo(proxy, "r"), autocommit=True)
    assert reader.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)   # a pooled standby connection now
    time.sleep(3.0)                                   # an idle cluster: the standby has replayed everything
    node = node_status(proxy, "pg", STANDBY_IP)
    assert node["lag"] == 0.0 and node["lag_bytes"] == 0 and node["skipped"] is None
    assert reader.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
    # Replay paused while writes go on: the standby falls behind, and the pooled connection to it retires.
    with standby_behind(proxy, pg_drill, -3):
        assert node_status(proxy, "pg", STANDBY_IP)["lag_bytes"] > 0
        assert reader.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)   # served by the writer
    wait_for(lambda: node_status(proxy, "pg", STANDBY_IP)["skipped"] is None, 15, "the standby to catch up",
             lambda: node_status(proxy, "pg", STANDBY_IP))
    assert reader.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
    reader.close()
    assert "lag" in proxy.log_text() and "no longer serves reader pools" in proxy.log_text()


@pytest.mark.timeout(180)
def test_pg_a_promoted_reader_stops_serving_the_reader_listener(pg_drill, proxy_factory):
    proxy = start_pg_proxy(pg_drill, proxy_factory)
    reader = psycopg.connect(**pg_conninfo(proxy, "r"), autocommit=True)
    assert reader.execute("SELECT pg_is_in_recovery(), host(inet_server_addr())").fetchone() == (True, STANDBY_IP)
    # The standby is promoted while DNS still names the primary as writer: the registry keeps the primary as
    # writer, and the reader pool must drop its pooled connection to the node that now answers as writer.
    pg_drill["primary"].psql("ALTER SYSTEM SET synchronous_standby_names = ''; SELECT pg_reload_conf()")
    pg_drill["standby"].promote()
    wait_for(lambda: node_status(proxy, "pg", STANDBY_IP)["role"] == "writer", 15, "the probe to see the promotion",
             lambda: admin_status(proxy)["registry"])
    answers = set()
    for _ in range(5):
        answers.add(reader.execute("SELECT host(inet_server_addr())").fetchone()[0])
    assert answers == {PRIMARY_IP}                 # the fallback writer, never the promoted node
    assert writer_of(proxy, "pg") == f"{PRIMARY_IP}:{pg_drill['port']}"
    reader.close()


def start_my_proxy(drill, proxy_factory, **health):
    config = my_config(drill)
    config["clusters"]["my"]["health"].update(health)
    proxy = proxy_factory(config)
    wait_for(lambda: writer_of(proxy, "my") == f"{MY_PRIMARY}:{drill['port']}", 15,
             "the registry to verify the primary as writer", lambda: admin_status(proxy)["registry"])
    return proxy


@pytest.mark.timeout(180)
def test_mysql_read_only_sessions_and_the_reader_listener_cannot_write_or_move_the_writer(my_drill, proxy_factory):
    proxy = start_my_proxy(my_drill, proxy_factory, probe_interval=30.0)
    other = my_connect(proxy.address("w"), autocommit=False)       # another client's open transaction
    other.cursor().execute("INSERT INTO drill (id, note) VALUES (100, 'other')")
    conn = my_connect(proxy.address("w"))
    cur = conn.cursor()
    cur.execute("SET SESSION TRANSACTION READ ONLY")
    with pytest.raises(pymysql.err.MySQLError) as refused:
        cur.execute("INSERT INTO drill (id, note) VALUES (1, 'ro')")
    assert refused.value.args[0] == 1792
    cur.execute("SELECT @@tx_read_only")
    assert cur.fetchone() == (1,)
    cur.execute("SET SESSION TRANSACTION READ WRITE")
    cur.execute("INSERT INTO drill (id, note) VALUES (2, 'rw')")
    conn.close()
    reader = my_connect(proxy.address("r"))
    rcur = reader.cursor()
    rcur.execute("SELECT @@read_only")
    assert rcur.fetchone() == (1,)
    with pytest.raises(pymysql.err.MySQLError) as refused:
        rcur.execute("INSERT INTO drill (id, note) VALUES (3, 'reader')")
    assert refused.value.args[0] in (1290, 1792)
    reader.close()
    other.commit()
    other.close()
    assert my_drill["primary"].sql(f"SELECT GROUP_CONCAT(id ORDER BY id) FROM {MY_DB}.drill") == "2,100"
    text = metrics_text(proxy)
    assert metric(text, "multiproxy_read_only_retries_total") == 0
    assert metric(text, "multiproxy_cluster_writer_changes_total", cluster="my") == 1     # the first writer only
    assert writer_of(proxy, "my") == f"{MY_PRIMARY}:{my_drill['port']}"


@pytest.mark.timeout(180)
def test_mysql_stopped_replication_takes_the_replica_out_of_reads(my_drill, proxy_factory):
    proxy = start_my_proxy(my_drill, proxy_factory)
    replica_ip = my_drill["replica"].host
    wait_for(lambda: node_status(proxy, "my", replica_ip)["skipped"] is None, 15, "the replica to serve reads",
             lambda: admin_status(proxy)["registry"])
    my_drill["replica"].sql("STOP SLAVE")
    try:
        wait_for(lambda: node_status(proxy, "my", replica_ip)["skipped"] not in (None, ""), 15,
                 "the replica to be skipped", lambda: admin_status(proxy)["registry"])
        node = node_status(proxy, "my", replica_ip)
        assert node["lag"] is None and "stopped" in node["skipped"]
        reader = my_connect(proxy.address("r"))
        cur = reader.cursor()
        cur.execute("SELECT @@read_only")
        assert cur.fetchone() == (0,)        # the writer (fallback), with the session read-only
        with pytest.raises(pymysql.err.MySQLError):
            cur.execute("INSERT INTO drill (id, note) VALUES (5, 'reader')")
        reader.close()
    finally:
        my_drill["replica"].sql("START SLAVE")
    wait_for(lambda: node_status(proxy, "my", replica_ip)["skipped"] is None, 15, "the replica to return",
             lambda: admin_status(proxy)["registry"])
    assert my_drill["primary"].sql(f"SELECT COUNT(*) FROM {MY_DB}.drill WHERE id = 5") == "0"


@pytest.mark.timeout(180)
def test_tds_reader_listener_never_writes(tds_drill, proxy_factory):
    proxy = proxy_factory(tds_config(tds_drill, probe_interval=30.0))
    wait_for(lambda: writer_of(proxy, "tds") == f"{TDS_WRITER}:{tds_drill['port']}", 15,
             "the registry to verify the first node as writer", lambda: admin_status(proxy)["registry"])
    reader = tds_connect(proxy.address("r"))
    cur = reader.cursor()
    with pytest.raises(pymssql.Error) as refused:
        cur.execute("INSERT INTO drill (id, note) VALUES (1, 'reader')")
    assert "3906" in str(refused.value)
    reader.close()
    writer = tds_connect(proxy.address("w"))
    cur = writer.cursor()
    cur.execute("SELECT COUNT(*) FROM drill WHERE id = 1")
    assert cur.fetchone() == (0,)
    writer.close()
    text = metrics_text(proxy)
    assert metric(text, "multiproxy_read_only_retries_total") == 0
    assert admin_status(proxy)["registry"]["tds"]["read_only_checks"]["total"] == 0
    assert writer_of(proxy, "tds") == f"{TDS_WRITER}:{tds_drill['port']}"


def test_concurrent_read_only_refusals_share_one_probe(pg_drill, proxy_factory):
    """Many sessions refused at once (a role defaulting to read-only) make one probe, not one each."""
    pg_drill["primary"].psql("CREATE ROLE ro_many LOGIN; GRANT ALL ON drill TO ro_many; "
                             "ALTER ROLE ro_many SET default_transaction_read_only = on")
    proxy = start_pg_proxy(pg_drill, proxy_factory, probe_interval=30.0)
    errors = []

    def refused(i):
        info = pg_conninfo(proxy)
        info["user"] = "ro_many"
        try:
            with psycopg.connect(**info, autocommit=True) as conn:
                conn.execute("INSERT INTO drill (id) VALUES (%s)", (200 + i,))
        except psycopg.errors.ReadOnlySqlTransaction:
            errors.append(i)
    threads = [threading.Thread(target=refused, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(errors) == list(range(6))
    checks = admin_status(proxy)["registry"]["pg"]["read_only_checks"]
    assert checks["not_writer"] == 0 and 1 <= checks["total"] <= 6
    assert writer_of(proxy, "pg") == f"{PRIMARY_IP}:{pg_drill['port']}"
