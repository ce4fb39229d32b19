"""Backend credential providers with every engine: PostgreSQL (the private server, pg8000), MySQL (the private
MariaDB, PyMySQL) and TDS (the TDS lab server, pymssql). The literal `password` is what the other modules use.

Per engine one proxy, clients trusted on the proxy, one client user per provider: its backend password comes from
password_env, a 0600 password_file, password_command or password_secret_arn (moto's Secrets Manager on loopback,
the `moto_endpoint` fixture). The client logs in through the proxy, runs a query and checks the rows.

Rotation: the password changes on the server (ALTER ROLE / ALTER USER; the TDS lab server takes its one login's
password on the command line and has no statement that changes it, so it is restarted on the same port and
database files with the new one) and in the provider's source (the env provider cannot rotate: a running proxy's
environment cannot change). The proxy still holds the old secret (cached 5 minutes), so the next new backend
connection -- a login to a second database, whose pool is new -- is refused once; the proxy drops the secret, and
the client's next login fetches it again and works.

A password file readable by its group is refused: the proxy's log names the file and says `chmod 600`, the client is
told the backend password could not be obtained, and no backend login is attempted without it.
"""
from __future__ import annotations

import json
import os
import shlex
import time

import pg8000.native
import pymysql
import pytest

from .awskit import AWS_ENV, secrets_client
from .helpers import metric, metrics_text
from .mysqlkit import wait_for
from .proxy import ProxyProcess, free_port
from .tdskit import DB as TDS_DB
from .tdskit import LAB_USER, LabProcess, pymssql_refusal

pymssql = pytest.importorskip("pymssql")

pytestmark = pytest.mark.timeout(60)

PROVIDERS = ("env", "file", "command", "secret_arn")
ROTATING = ("file", "command", "secret_arn")
SETUP_FAILED = "multiproxy_database_connections_setup_failed_total"
ROWS = [(1, "alpha"), (2, "beta"), (3, "gamma")]
MY_DB, MY_ROT_DB = "mpdb", "mpdb_rotation"     # the second database: a new pool, so a new backend connection
TDS_ROT_DB = "rotdb"
CONNECT_TIMEOUT, QUERY_TIMEOUT = 10, 30


def write_secret(path, text: str, mode: int = 0o600) -> None:
    """Write `text` to `path` as a rotation agent would: a new file with `mode` renamed over the old one."""
    temporary = f"{path}.new"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.chmod(temporary, mode)   # whatever the umask
    os.replace(temporary, path)


class Sources:
    """The backend password sources of one proxy: one per (client user, provider), all in `root` or moto."""

    def __init__(self, root, endpoint: str, tag: str):
        self.root, self.endpoint, self.tag = root, endpoint, tag
        self.env: dict[str, str] = {}
        self.arns: dict[str, str] = {}

    def credential(self, user: str, provider: str, backend_user: str, password: str) -> dict:
        """The [[clusters.NAME.credentials]] table of client `user`, its source holding `password`."""
        table = {"user": user, "backend_user": backend_user}
        if provider == "env":
            name = f"MP_TEST_{self.tag}_{user}".upper()
            self.env[name] = password
            table["password_env"] = name
        elif provider == "file":
            table["password_file"] = str(self.root / f"{user}.password")
        elif provider == "command":
            table["password_command"] = "cat " + shlex.quote(str(self.root / f"{user}.command-source"))
        else:
            name = f"mp/{self.tag}/{user}-{time.time_ns()}"
            document = json.dumps({"username": backend_user, "password": password})
            self.arns[user] = secrets_client(self.endpoint).create_secret(Name=name, SecretString=document)["ARN"]
            table.update(password_secret_arn=self.arns[user], aws_endpoint_url=self.endpoint)  # region: the ARN's
        self.set(user, provider, password, backend_user)
        return table

    def set(self, user: str, provider: str, password: str, backend_user: str = "") -> None:
        """Put `password` into the source (rotation)."""
        if provider == "file":
            write_secret(self.root / f"{user}.password", password)
        elif provider == "command":
            write_secret(self.root / f"{user}.command-source", password)
        elif provider == "secret_arn" and user in self.arns:
            document = json.dumps({"username": backend_user, "password": password})
            secrets_client(self.endpoint).put_secret_value(SecretId=self.arns[user], SecretString=document)


def start_proxy(workdir, clusters: dict, listeners: list, env: dict) -> ProxyProcess:
    config = {"proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "info"},
              "clusters": clusters, "listeners": listeners}
    return ProxyProcess(config, workdir=str(workdir), env={**AWS_ENV, **env}).start()


def setup_failures(proxy, user: str) -> float:
    return metric(metrics_text(proxy), SETUP_FAILED, user=user) or 0.0


def assert_secrets_not_logged(proxy, passwords) -> None:
    log = proxy.log_text()
    for password in passwords:
        assert password not in log


# ------------------------------------------------------------------------------------------- PostgreSQL

PG_DB, PG_ROT_DB = "mpdb", "mpdb_rotation"


class PgStack:
    def __init__(self, pg, proxy: ProxyProcess, sources: Sources):
        self.pg, self.proxy, self.sources = pg, proxy, sources
        self.passwords: list[str] = []

    def connect(self, user: str, database: str = PG_DB):
        return pg8000.native.Connection(user, host=self.proxy.host, port=self.proxy.port, database=database,
                                        timeout=CONNECT_TIMEOUT)


def pg_rows(conn) -> tuple[str, list]:
    (current,), = conn.run("SELECT current_user")
    return current, [tuple(row) for row in conn.run("SELECT id, name FROM credential_rows ORDER BY id")]


@pytest.fixture(scope="module")
def pg_stack(pg, moto_endpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("pg-credentials")
    users = {"mp_cred": "cred-pw-0", **{f"mp_rot_{p}": f"rot-{p}-pw-0" for p in ROTATING}}
    for user, password in users.items():
        pg.psql(f"SET password_encryption = 'scram-sha-256';\n"
                f"CREATE ROLE {user} LOGIN NOCREATEDB NOSUPERUSER PASSWORD '{password}';", timeout=30)
    pg.add_hba_lines([f"host all {user} 127.0.0.1/32 scram-sha-256" for user in users])
    pg.psql(f"CREATE DATABASE {PG_ROT_DB};", timeout=30)
    for database in (PG_DB, PG_ROT_DB):
        pg.psql("CREATE TABLE credential_rows (id int PRIMARY KEY, name text);\n"
                "INSERT INTO credential_rows VALUES " + ", ".join(f"({i}, '{n}')" for i, n in ROWS) + ";\n"
                f"GRANT SELECT ON credential_rows TO {', '.join(users)};", db=database, timeout=30)
    sources = Sources(root, moto_endpoint, "pg")
    credentials = [sources.credential(p, p, "mp_cred", users["mp_cred"]) for p in PROVIDERS]
    credentials += [sources.credential(f"rot_{p}", p, f"mp_rot_{p}", users[f"mp_rot_{p}"]) for p in ROTATING]
    cluster = {"engine": "postgres", "hosts": [f"127.0.0.1:{pg.port}"], "backend": {"tls": "disable"},
               "pool": {"max_size": 2, "borrow_timeout": 10.0}, "credentials": credentials}
    listener = {"name": "pg", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "auth": "trust"}
    proxy = start_proxy(root / "proxy", {"main": cluster}, [listener], sources.env)
    stack = PgStack(pg, proxy, sources)
    stack.passwords = list(users.values())
    try:
        for provider in ROTATING:                           # the proxy caches each rotation user's first secret
            conn = stack.connect(f"rot_{provider}")
            try:
                assert pg_rows(conn) == (f"mp_rot_{provider}", ROWS)
            finally:
                conn.close()
        yield stack
    finally:
        proxy.stop()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_pg_login_with_provider(pg_stack, provider):
    conn = pg_stack.connect(provider)
    try:
        assert pg_rows(conn) == ("mp_cred", ROWS)
    finally:
        conn.close()
    assert setup_failures(pg_stack.proxy, provider) == 0
    assert_secrets_not_logged(pg_stack.proxy, pg_stack.passwords)


@pytest.mark.parametrize("provider", ROTATING)
def test_pg_rotation_refused_once_then_fetched_again(pg_stack, provider):
    user, backend_user = f"rot_{provider}", f"mp_rot_{provider}"
    new_password = f"rot-{provider}-pw-1"
    pg_stack.passwords.append(new_password)
    before = setup_failures(pg_stack.proxy, user)
    pg_stack.pg.psql(f"SET password_encryption = 'scram-sha-256';\n"
                     f"ALTER ROLE {backend_user} PASSWORD '{new_password}';", timeout=30)
    pg_stack.sources.set(user, provider, new_password, backend_user)
    with pytest.raises(pg8000.native.DatabaseError) as refused:     # the proxy still holds the old secret
        pg_stack.connect(user, PG_ROT_DB)
    # the server's own refusal of the backend login (28P01 and its text; the proxy's log names the login)
    assert refused.value.args[0]["C"] == "28P01"
    assert refused.value.args[0]["M"] == f'password authentication failed for user "{backend_user}"'
    conn = pg_stack.connect(user, PG_ROT_DB)                        # fetched again after the refusal
    try:
        assert pg_rows(conn) == (backend_user, ROWS)
        assert conn.run("SELECT current_database()") == [[PG_ROT_DB]]
    finally:
        conn.close()
    assert setup_failures(pg_stack.proxy, user) == before + 1
    assert_secrets_not_logged(pg_stack.proxy, pg_stack.passwords)


# ------------------------------------------------------------------------------------------------ MySQL

class MyStack:
    def __init__(self, mariadb, proxy: ProxyProcess, sources: Sources):
        self.mariadb, self.proxy, self.sources = mariadb, proxy, sources
        self.passwords: list[str] = []

    def connect(self, user: str, database: str = MY_DB) -> pymysql.connections.Connection:
        return pymysql.connect(host=self.proxy.host, port=self.proxy.port, user=user, password="", database=database,
                               autocommit=True, connect_timeout=CONNECT_TIMEOUT, read_timeout=QUERY_TIMEOUT,
                               write_timeout=QUERY_TIMEOUT)


def my_rows(conn) -> tuple[str, list]:
    with conn.cursor() as cur:
        cur.execute("SELECT CURRENT_USER()")
        (current,), = cur.fetchall()
        cur.execute(f"SELECT id, name FROM {MY_DB}.credential_rows ORDER BY id")
        return current, [tuple(row) for row in cur.fetchall()]


@pytest.fixture(scope="module")
def mysql_stack(mariadb, moto_endpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("mysql-credentials")
    statements = [f"CREATE DATABASE IF NOT EXISTS {MY_ROT_DB};",
                  f"CREATE TABLE IF NOT EXISTS {MY_DB}.credential_rows (id INT PRIMARY KEY, name VARCHAR(20));",
                  f"REPLACE INTO {MY_DB}.credential_rows VALUES " + ", ".join(f"({i}, '{n}')" for i, n in ROWS) + ";"]
    users = {"mp_cred": "cred-pw-0", **{f"mp_rot_{p}": f"rot-{p}-pw-0" for p in ROTATING}}
    for user, password in users.items():
        statements += [f"CREATE OR REPLACE USER '{user}'@'%' IDENTIFIED BY '{password}';",
                       f"GRANT SELECT ON {MY_DB}.* TO '{user}'@'%';", f"GRANT SELECT ON {MY_ROT_DB}.* TO '{user}'@'%';"]
    mariadb.sql("\n".join(statements), timeout=30)

    sources = Sources(root, moto_endpoint, "my")
    credentials = [sources.credential(p, p, "mp_cred", users["mp_cred"]) for p in PROVIDERS]
    credentials += [sources.credential(f"rot_{p}", p, f"mp_rot_{p}", users[f"mp_rot_{p}"]) for p in ROTATING]
    bad_file = root / "badfile.password"
    write_secret(bad_file, users["mp_cred"], 0o640)        # the right password, but the group can read it
    credentials.append({"user": "badfile", "backend_user": "mp_cred", "password_file": str(bad_file)})
    cluster = {"engine": "mysql", "hosts": [f"127.0.0.1:{mariadb.port}"], "backend": {"tls": "disable"},
               "pool": {"max_size": 2, "borrow_timeout": 10.0}, "credentials": credentials}
    listener = {"name": "my", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "auth": "trust"}
    proxy = start_proxy(root / "proxy", {"main": cluster}, [listener], sources.env)
    stack = MyStack(mariadb, proxy, sources)
    stack.passwords = list(users.values())
    try:
        for provider in ROTATING:                           # the proxy caches each rotation user's first secret
            with stack.connect(f"rot_{provider}") as conn:
                assert my_rows(conn) == (f"mp_rot_{provider}@%", ROWS)
        yield stack
    finally:
        proxy.stop()


@pytest.mark.mysql
@pytest.mark.parametrize("provider", PROVIDERS)
def test_mysql_login_with_provider(mysql_stack, provider):
    with mysql_stack.connect(provider) as conn:
        assert my_rows(conn) == ("mp_cred@%", ROWS)
    assert setup_failures(mysql_stack.proxy, provider) == 0
    assert_secrets_not_logged(mysql_stack.proxy, mysql_stack.passwords)


@pytest.mark.mysql
@pytest.mark.parametrize("provider", ROTATING)
def test_mysql_rotation_refused_once_then_fetched_again(mysql_stack, provider):
    user, backend_user = f"rot_{provider}", f"mp_rot_{provider}"
    new_password = f"rot-{provider}-pw-1"
    mysql_stack.passwords.append(new_password)
    before = setup_failures(mysql_stack.proxy, user)
    mysql_stack.mariadb.sql(f"ALTER USER '{backend_user}'@'%' IDENTIFIED BY '{new_password}';", timeout=30)
    mysql_stack.sources.set(user, provider, new_password, backend_user)
    with pytest.raises(pymysql.err.OperationalError) as refused:    # the proxy still holds the old secret
        mysql_stack.connect(user, MY_ROT_DB)
    # the server's own refusal of the backend login (the proxy's log names the login)
    assert refused.value.args[0] == 1045 and f"Access denied for user '{backend_user}'" in refused.value.args[1]
    with mysql_stack.connect(user, MY_ROT_DB) as conn:              # fetched again after the refusal
        assert my_rows(conn) == (f"{backend_user}@%", ROWS)
        with conn.cursor() as cur:
            cur.execute("SELECT DATABASE()")
            assert cur.fetchall() == ((MY_ROT_DB,),)
    assert setup_failures(mysql_stack.proxy, user) == before + 1
    assert_secrets_not_logged(mysql_stack.proxy, mysql_stack.passwords)


@pytest.mark.mysql
def test_mysql_group_readable_password_file_is_refused(mysql_stack):
    """The proxy's log names the file and says chmod 600; the client is told the password could not be obtained,
    and the backend sees no login attempt without a password (MariaDB counts it in Access_denied_errors)."""
    path = mysql_stack.sources.root / "badfile.password"
    key = f"clusters.main.credentials[{len(PROVIDERS) + len(ROTATING)}]"

    def access_denied_errors() -> int:
        return int(mysql_stack.mariadb.sql("SHOW GLOBAL STATUS LIKE 'Access_denied_errors';", timeout=30).split()[1])

    denied = access_denied_errors()
    with pytest.raises(pymysql.err.OperationalError) as refused:
        mysql_stack.connect("badfile")
    assert refused.value.args[0] == 2003
    assert f"the backend password of user 'badfile' could not be obtained ({key})" in refused.value.args[1]
    assert str(path) not in refused.value.args[1]          # the file's name is for the operator: in the log
    expected = (f"{key}.password_file: {path} is readable or writable by group or others (mode 640); "
                f"run: chmod 600 {path}")
    assert wait_for(lambda: expected in mysql_stack.proxy.log_text(), 5), mysql_stack.proxy.log_tail()
    assert access_denied_errors() == denied
    os.chmod(path, 0o600)                                  # the operator follows the advice
    with mysql_stack.connect("badfile") as conn:
        assert my_rows(conn) == ("mp_cred@%", ROWS)


# ------------------------------------------------------------------------------------------------- TDS

class TdsStack:
    def __init__(self, proxy: ProxyProcess, sources: Sources, rotation_lab: LabProcess, rotation_dir):
        self.proxy, self.sources = proxy, sources
        self.rotation_lab, self.rotation_dir = rotation_lab, rotation_dir
        self.passwords: list[str] = []

    def connect(self, listener: str, user: str, database: str = TDS_DB):
        host, port = self.proxy.address(listener)
        return pymssql.connect(server=host, port=port, user=user, password="", database=database, autocommit=True,
                               tds_version="7.4", login_timeout=CONNECT_TIMEOUT, timeout=QUERY_TIMEOUT)

    def refused_login_number(self, listener: str, user: str, database: str) -> int:
        host, port = self.proxy.address(listener)
        return pymssql_refusal(server=host, port=port, user=user, password="", database=database, autocommit=True)[0]

    def restart_rotation_lab(self, password: str) -> None:
        """The lab server has no ALTER LOGIN: restart it on the same port and files with a new password."""
        port = self.rotation_lab.port
        self.rotation_lab.stop()
        self.rotation_lab = LabProcess(self.rotation_dir, "--database", TDS_ROT_DB, port=port, password=password)


def tds_rows(conn) -> tuple[str, list]:
    cur = conn.cursor()
    cur.execute("SELECT SUSER_NAME()")
    (login,), = cur.fetchall()
    cur.execute("SELECT id, name FROM credential_rows ORDER BY id")
    return login, [tuple(row) for row in cur.fetchall()]


def make_tds_rows(lab: LabProcess, password: str, database: str) -> None:
    with pymssql.connect(server="127.0.0.1", port=lab.port, user=LAB_USER, password=password, database=database,
                         autocommit=True, tds_version="7.4", login_timeout=CONNECT_TIMEOUT,
                         timeout=QUERY_TIMEOUT) as conn:
        cur = conn.cursor()
        cur.execute("CREATE TABLE credential_rows (id INT PRIMARY KEY, name NVARCHAR(20))")
        for row in ROWS:
            cur.execute("INSERT INTO credential_rows VALUES (%d, %s)", row)


@pytest.fixture(scope="module")
def tds_stack(moto_endpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("tds-credentials")
    main_dir, rotation_dir = root / "lab-main", root / "lab-rotation"
    main_dir.mkdir()
    rotation_dir.mkdir()
    password, rotation_password = "Lab-cred-pw-0", "Lab-rot-pw-0"
    main_lab = LabProcess(main_dir, password=password)
    rotation_lab = LabProcess(rotation_dir, "--database", TDS_ROT_DB, password=rotation_password)
    proxy = None
    try:
        make_tds_rows(main_lab, password, TDS_DB)
        for database in (TDS_DB, TDS_ROT_DB):
            make_tds_rows(rotation_lab, rotation_password, database)
        sources = Sources(root, moto_endpoint, "tds")
        clusters = {}
        for name, lab, credentials in (
                ("main", main_lab, [sources.credential(p, p, LAB_USER, password) for p in PROVIDERS]),
                ("rotation", rotation_lab,
                 [sources.credential(f"rot_{p}", p, LAB_USER, rotation_password) for p in ROTATING])):
            clusters[name] = {"engine": "tds", "hosts": [f"127.0.0.1:{lab.port}"], "backend": {"tls": "disable"},
                              "pool": {"max_size": 2, "borrow_timeout": 10.0}, "credentials": credentials}
        listeners = [{"name": name, "listen": f"127.0.0.1:{free_port()}", "cluster": name, "auth": "trust"}
                     for name in clusters]
        proxy = start_proxy(root / "proxy", clusters, listeners, sources.env)
        stack = TdsStack(proxy, sources, rotation_lab, rotation_dir)
        stack.passwords = [password, rotation_password]
        for provider in ROTATING:                           # the proxy caches each rotation user's first secret
            with stack.connect("rotation", f"rot_{provider}") as conn:
                assert tds_rows(conn) == (LAB_USER, ROWS)
        yield stack
        rotation_lab = stack.rotation_lab
    finally:
        if proxy is not None:
            proxy.stop()
        main_lab.stop()
        rotation_lab.stop()


@pytest.mark.tds
@pytest.mark.parametrize("provider", PROVIDERS)
def test_tds_login_with_provider(tds_stack, provider):
    with tds_stack.connect("main", provider) as conn:
        assert tds_rows(conn) == (LAB_USER, ROWS)
    assert setup_failures(tds_stack.proxy, provider) == 0
    assert_secrets_not_logged(tds_stack.proxy, tds_stack.passwords)


@pytest.mark.tds
@pytest.mark.parametrize("provider", ROTATING)
def test_tds_rotation_refused_once_then_fetched_again(tds_stack, provider):
    user = f"rot_{provider}"
    new_password = f"Lab-rot-{provider}-pw-1"
    tds_stack.passwords.append(new_password)
    refusal = f"backend refused the login of '{LAB_USER}': Login failed for user '{LAB_USER}'. (error 18456)"
    before = setup_failures(tds_stack.proxy, user), tds_stack.proxy.log_text().count(refusal)
    tds_stack.restart_rotation_lab(new_password)
    tds_stack.sources.set(user, provider, new_password, LAB_USER)
    # The proxy still holds the old secret: the client gets the server's refusal (18456); pymssql keeps the
    # server's text only for the process's first failed login, so the backend's refusal is read from the log.
    assert tds_stack.refused_login_number("rotation", user, TDS_ROT_DB) == 18456
    assert tds_stack.proxy.log_text().count(refusal) == before[1] + 1
    with tds_stack.connect("rotation", user, TDS_ROT_DB) as conn:  # fetched again after the refusal
        assert tds_rows(conn) == (LAB_USER, ROWS)
        cur = conn.cursor()
        cur.execute("SELECT DB_NAME()")
        assert cur.fetchall() == [(TDS_ROT_DB,)]
    assert setup_failures(tds_stack.proxy, user) == before[0] + 1
    assert_secrets_not_logged(tds_stack.proxy, tds_stack.passwords)
