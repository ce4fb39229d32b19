"""Fixtures for integration tests: a private PostgreSQL for the session and a factory of proxy processes."""
from __future__ import annotations

import os

import pytest

from .pgserver import PostgresServer
from .proxy import ProxyProcess

INTEGRATION_TIMEOUT = 120  # seconds per test unless the test says otherwise
_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    """Mark every test under tests/integration as `integration` with a default timeout."""
    for item in items:
        if not str(item.path).startswith(_HERE + os.sep):
            continue
        item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(INTEGRATION_TIMEOUT))


@pytest.fixture(scope="session")
def pg():
    """One private PostgreSQL for the session, with the AUTH_ROLES and database mpdb set up."""
    server = PostgresServer()
    server.start()
    try:
        server.create_auth_roles()
        yield server
    finally:
        server.stop()


MARIADB_DB = "mpdb"
# Backend users of the private MariaDB, by login method: (user, password, how MariaDB authenticates it).
MARIADB_USERS = (("mp_native", "native-pw", "mysql_native_password"),
                 ("mp_ed25519", "ed-pw", "ed25519"))


@pytest.fixture(scope="session")
def mariadb():
    """One private MariaDB for the session, with database mpdb and the MARIADB_USERS."""
    from multiproxy.lab.mariadb import MariaDBServer
    server = MariaDBServer()
    server.start()
    try:
        server.sql("INSTALL SONAME 'auth_ed25519';")
        statements = [f"CREATE DATABASE {MARIADB_DB};"]
        for user, password, method in MARIADB_USERS:
            if method == "ed25519":
                statements.append(f"CREATE USER '{user}'@'%' IDENTIFIED VIA ed25519 USING PASSWORD('{password}');")
            else:
                statements.append(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}';")
            statements.append(f"GRANT ALL ON *.* TO '{user}'@'%';")
        server.sql("\n".join(statements))
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory):
    """moto's Secrets Manager server on loopback for the session (tests/integration/awskit.py); its URL."""
    from .awskit import moto_server
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def shared_lab(tmp_path_factory):
    """One `multiproxy lab up --detach` of every engine for the session (labkit.SharedLab), for tests that run
    clients through the lab's own listeners; taken down at the end."""
    from .labkit import SharedLab
    lab = SharedLab(str(tmp_path_factory.mktemp("shared-lab") / "lab"))
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


@pytest.fixture
def proxy_factory(tmp_path):
    """Call with (config, **ProxyProcess kwargs) to start a proxy; all of them stop at teardown."""
    started: list[ProxyProcess] = []

    def start(config, **kwargs) -> ProxyProcess:
        kwargs.setdefault("workdir", str(tmp_path / f"proxy{len(started)}"))
        proxy = ProxyProcess(config, **kwargs)
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in reversed(started):
        proxy.stop()
