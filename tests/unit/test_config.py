"""build_config: a valid configuration loads; every mistake is reported, all at once, each naming its key path."""
from __future__ import annotations

import copy

import pytest

from multiproxy.config import ConfigError, build_config, load_config


class FakeEngine:
    default_port = 5432
    client_auth_methods = ("trust", "md5", "scram-sha-256")


ENGINES = {"postgres": FakeEngine}


def valid() -> dict:
    return {
        "proxy": {"admin_listen": "127.0.0.1:9930", "workers": 2, "max_message_size": 1 << 20},
        "auth": {"users_file": "users.toml"},
        "clusters": {
            "orders": {
                "engine": "postgres",
                "hosts": ["db1.internal:5432", "db2.internal", "[::1]:6543"],
                "backend": {"tls": "require", "connect_timeout": 3},
                "pool": {"mode": "transaction", "min_size": 2, "max_size": 10},
                "credentials": [{"user": "*", "password_env": "ORDERS_PASSWORD"}],
                "pinning": {"advisory_lock": "ignore"},
                "options": {"prepared_statements": "virtualize"},
                "health": {"probe_user": "monitor"},
            },
        },
        "listeners": [
            {"name": "orders", "listen": "0.0.0.0:6432", "cluster": "orders"},
            {"name": "orders-ro", "listen": "0.0.0.0:6433", "cluster": "orders", "role": "reader", "auth": "md5"},
        ],
    }


def problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build_config(raw, "proxy.toml", ENGINES)
    assert info.value.source == "proxy.toml"
    return info.value.problems


def test_valid_config_loads_with_defaults_filled_in():
    config = build_config(valid(), "/etc/multiproxy/proxy.toml", ENGINES)
    assert config.proxy.workers == 2
    assert config.proxy.handshake_timeout == 10.0
    assert config.users_file == "/etc/multiproxy/users.toml"
    orders = config.clusters["orders"]
    assert orders.hosts == (("db1.internal", 5432), ("db2.internal", 5432), ("::1", 6543))
    assert orders.backend.tls == "require" and orders.backend.connect_timeout == 3.0
    assert orders.pool.min_size == 2 and orders.pool.max_size == 10 and orders.pool.borrow_timeout == 5.0
    assert orders.credential_for("anyone").password_env == "ORDERS_PASSWORD"
    assert orders.pinning == {"advisory_lock": "ignore"}
    assert orders.engine_options == {"prepared_statements": "virtualize"}
    first, second = config.listeners
    assert first.listen == ("0.0.0.0", 6432) and first.auth == "scram-sha-256" and first.role == "writer"
    assert second.role == "reader" and second.auth == "md5"


def test_load_config_reads_toml(tmp_path):
    path = tmp_path / "proxy.toml"
    path.write_text('[clusters.main]\nengine = "postgres"\nhosts = ["db:5432"]\n\n'
                    '[[listeners]]\nname = "pg"\nlisten = "127.0.0.1:6432"\ncluster = "main"\nauth = "trust"\n')
    config = load_config(str(path), ENGINES)
    assert config.listeners[0].cluster == "main"
    assert config.users_file == ""


def test_load_config_reports_bad_toml(tmp_path):
    path = tmp_path / "proxy.toml"
    path.write_text("[proxy\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert len(info.value.problems) == 1 and "not valid TOML" in info.value.problems[0]
    assert str(path) in str(info.value)


def test_several_mistakes_are_reported_together_each_with_its_key_path():
    raw = valid()
    raw["proxy"]["workers"] = 0
    raw["proxy"]["colour"] = "blue"
    raw["clusters"]["orders"]["hosts"][0] = "db1.internal:99999"
    raw["clusters"]["orders"]["pool"]["max_size"] = "ten"
    raw["clusters"]["orders"]["backend"]["tls"] = "sometimes"
    raw["listeners"][1]["cluster"] = "invoices"
    found = problems(raw)
    assert len(found) == 6
    paths = [problem.split(":")[0] for problem in found]
    assert set(paths) == {"proxy.workers", "proxy.colour", "clusters.orders.hosts[0]", "clusters.orders.pool.max_size",
                          "clusters.orders.backend.tls", "listeners[1].cluster"}
    assert "6 problem(s)" in str(ConfigError(found, "proxy.toml"))


def test_unknown_keys_at_every_level():
    raw = valid()
    raw["extra"] = {}
    raw["auth"]["user_file"] = "x"
    raw["clusters"]["orders"]["replicas"] = []
    raw["clusters"]["orders"]["pool"]["size"] = 3
    raw["clusters"]["orders"]["credentials"][0]["passwd"] = "x"
    raw["listeners"][0]["port"] = 6432
    found = problems(raw)
    for path in ("extra", "auth.user_file", "clusters.orders.replicas", "clusters.orders.pool.size",
                 "clusters.orders.credentials[0].passwd", "listeners[0].port"):
        assert any(problem.startswith(path + ":") for problem in found), (path, found)
    assert any("known:" in problem for problem in found)


@pytest.mark.parametrize("address", ["orders", "db:", ":5432", "db:0", "db:65536", "db:54x", "[::1]", 5432, ""])
def test_bad_listen_address(address):
    raw = valid()
    raw["listeners"][0]["listen"] = address
    found = problems(raw)
    assert len(found) == 1
    assert found[0].startswith("listeners[0].listen: ")


def test_bad_listen_address_message_quotes_the_value():
    raw = valid()
    raw["listeners"][0]["listen"] = "orders"
    assert problems(raw) == ["listeners[0].listen: expected host:port, got 'orders'"]


def test_host_without_port_takes_the_engines_default_port():
    raw = valid()
    raw["clusters"]["orders"]["hosts"] = ["db"]
    assert build_config(raw, "", ENGINES).clusters["orders"].hosts == (("db", 5432),)


def test_host_without_port_is_an_error_without_an_engine_default():
    raw = valid()
    raw["clusters"]["orders"]["hosts"] = ["db"]
    with pytest.raises(ConfigError) as info:
        build_config(raw, "", None)
    assert info.value.problems == ["clusters.orders.hosts[0]: expected host:port, got 'db'"]


def test_bad_admin_listen():
    raw = valid()
    raw["proxy"]["admin_listen"] = "localhost"
    assert [p.split(":")[0] for p in problems(raw)] == ["proxy.admin_listen"]


def test_listener_naming_a_missing_cluster():
    raw = valid()
    raw["listeners"][0]["cluster"] = "invoices"
    (problem,) = problems(raw)
    assert problem.startswith("listeners[0].cluster: ")
    assert "'invoices'" in problem and "orders" in problem


def test_pool_min_size_above_max_size():
    raw = valid()
    raw["clusters"]["orders"]["pool"].update(min_size=11, max_size=10)
    (problem,) = problems(raw)
    assert problem.startswith("clusters.orders.pool.min_size: ")
    assert "10" in problem and "11" in problem


def test_missing_required_settings_are_named():
    raw = valid()
    del raw["listeners"][0]["name"], raw["listeners"][0]["listen"]
    found = problems(raw)
    assert {p.split(":")[0] for p in found} == {"listeners[0].name", "listeners[0].listen"}


def test_no_listeners():
    raw = valid()
    raw["listeners"] = []
    assert [p.split(":")[0] for p in problems(raw)] == ["listeners"]


def test_duplicate_listener_name_and_address():
    raw = valid()
    raw["listeners"].append(copy.deepcopy(raw["listeners"][0]))
    assert {p.split(":")[0] for p in problems(raw)} == {"listeners[2].name", "listeners[2].listen"}


def test_unknown_engine_names_the_loaded_ones():
    raw = valid()
    raw["clusters"]["orders"]["engine"] = "oracle"
    raw["clusters"]["orders"]["hosts"] = ["db1.internal:5432"]   # no default port to lean on
    (problem,) = problems(raw)
    assert problem.startswith("clusters.orders.engine: ") and "'oracle'" in problem and "postgres" in problem


def test_wrong_types_and_choices():
    raw = valid()
    raw["proxy"]["handshake_timeout"] = "soon"
    raw["proxy"]["workers"] = True
    raw["listeners"][0]["auth"] = "kerberos"
    raw["clusters"]["orders"]["pinning"]["listen"] = "sometimes"
    assert {p.split(":")[0] for p in problems(raw)} == {
        "proxy.handshake_timeout", "proxy.workers", "listeners[0].auth", "clusters.orders.pinning.listen"}


def test_password_auth_needs_a_users_file():
    raw = valid()
    del raw["auth"]
    assert {p.split(":")[0] for p in problems(raw)} == {"listeners[0].auth", "listeners[1].auth"}


def test_two_secret_sources_for_one_credential():
    raw = valid()
    raw["clusters"]["orders"]["credentials"][0]["password_file"] = "secret.txt"
    (problem,) = problems(raw)
    assert problem.startswith("clusters.orders.credentials[0]: ")
    assert "password_env" in problem and "password_file" in problem


def test_aws_settings_need_a_secret_arn():
    raw = valid()
    raw["clusters"]["orders"]["credentials"][0]["aws_region"] = "eu-west-1"
    assert [p.split(":")[0] for p in problems(raw)] == ["clusters.orders.credentials[0].aws_region"]
    cred = raw["clusters"]["orders"]["credentials"][0]
    del cred["password_env"]
    cred["password_secret_arn"] = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:db-AbCdEf"
    config = build_config(raw, known_engines={"postgres": type("PG", (), {"default_port": 5432})})
    assert config.clusters["orders"].credentials[0].secret_source() == {
        "password_secret_arn": cred["password_secret_arn"], "aws_region": "eu-west-1"}


def test_token_listener_settings():
    raw = valid()
    raw["listeners"][0]["auth"] = "token"
    raw["listeners"][0]["token_kind"] = "rds_iam"
    found = problems(raw)
    assert any("'token' needs TLS on the client leg" in p for p in found)
    assert any("iam_access_keys_file: needed" in p for p in found)
    assert any("does not declare supports_token_auth" in p for p in problems(raw))   # FakeEngine does not


def real_engines() -> dict:
    from multiproxy.plugins import load_engines
    return {name: loaded.engine for name, loaded in load_engines().items()}


def tls_listener_config(tmp_path, engine: str, **listener) -> dict:
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text("not read by build_config")
    keys = tmp_path / "keys.toml"
    keys.write_text('AKID = "secret"\n')
    keys.chmod(0o600)
    return {"clusters": {"c": {"engine": engine, "hosts": ["db.internal"]}},
            "listeners": [{"name": "l", "listen": "127.0.0.1:7000", "cluster": "c", "auth": "token",
                           "token_kind": "rds_iam", "iam_access_keys_file": str(keys),
                           "tls_cert_file": str(tmp_path / "cert.pem"), "tls_key_file": str(tmp_path / "key.pem"),
                           **listener}]}


@pytest.mark.parametrize("engine", ["postgres", "mysql", "tds"])
def test_token_listeners_on_engines_that_declare_support(tmp_path, engine):
    config = build_config(tls_listener_config(tmp_path, engine), "", real_engines())
    assert config.listeners[0].token_verifier.kind == "rds_iam"


def test_iam_hostname_is_parsed_into_the_verifiers_addresses(tmp_path):
    config = build_config(tls_listener_config(tmp_path, "postgres", iam_hostname="db.proxy.test"), "", real_engines())
    assert config.listeners[0].token_verifier.addresses == [("127.0.0.1", 7000), ("db.proxy.test", 7000)]
    config = build_config(tls_listener_config(tmp_path, "postgres", iam_hostname="[::1]:5432"), "", real_engines())
    assert config.listeners[0].token_verifier.addresses == [("127.0.0.1", 7000), ("::1", 5432)]
    with pytest.raises(ConfigError) as info:
        build_config(tls_listener_config(tmp_path, "postgres", iam_hostname="db:notaport"), "", real_engines())
    assert "listeners[0]: expected host:port, got 'db:notaport'" in str(info.value)
    # A missing key file is the problem reported first, as before.
    with pytest.raises(ConfigError) as info:
        build_config(tls_listener_config(tmp_path, "postgres", iam_hostname="db:notaport", iam_access_keys_file=""),
                     "", real_engines())
    assert "iam_access_keys_file: needed" in str(info.value) and "notaport" not in str(info.value)


def test_token_refused_for_an_engine_that_does_not_declare_it(tmp_path):
    from multiproxy.engine import Engine

    class ThirdParty(Engine):
        name, default_port = "thirdparty", 7000

    with pytest.raises(ConfigError) as info:
        build_config(tls_listener_config(tmp_path, "thirdparty"), "", {"thirdparty": ThirdParty()})
    (problem,) = info.value.problems
    assert problem.startswith("listeners[0].auth: 'token' is not supported by engine 'thirdparty'")


def test_tds_listener_tls_policy(tmp_path):
    engines = real_engines()
    policy = {"tls_ciphers": "ECDHE+AESGCM", "tls_client_ca_file": str(tmp_path / "ca.pem"), "tls_verify_client": True}
    listener = build_config(tls_listener_config(tmp_path, "tds", **policy), "", engines).listeners[0]
    assert listener.tls_verify_client and listener.tls_ciphers == "ECDHE+AESGCM"
    with pytest.raises(ConfigError) as info:
        build_config(tls_listener_config(tmp_path, "tds", tls_min_version="TLSv1.3"), "", engines)
    (problem,) = info.value.problems
    assert problem.startswith("listeners[0].tls_min_version: TDS 7.x listeners offer TLS 1.2 only")
    assert "Remove tls_min_version" in problem
    build_config(tls_listener_config(tmp_path, "mysql", tls_min_version="TLSv1.3"), "", engines)


def test_require_tls_without_a_certificate():
    raw = valid()
    raw["listeners"][0]["require_tls"] = True
    assert [p.split(":")[0] for p in problems(raw)] == ["listeners[0].require_tls"]


def test_section_of_the_wrong_type():
    raw = valid()
    raw["proxy"] = "fast"
    assert [p.split(":")[0] for p in problems(raw)] == ["proxy"]


def test_clusters_that_verify_roles_need_a_probe_user():
    raw = valid()
    del raw["clusters"]["orders"]["health"]
    with pytest.raises(ConfigError) as info:
        build_config(raw, "proxy.toml")
    assert any(p.startswith("clusters.orders.health.probe_user:") for p in info.value.problems)


def test_endpoints_take_the_engine_port_and_dns_settings():
    raw = valid()
    raw["clusters"]["orders"]["endpoints"] = {"writer": "writer.orders.lab", "reader": "reader.orders.lab:6000"}
    raw["clusters"]["orders"]["dns"] = {"nameserver": "127.0.0.1:5353", "ttl_floor": 1, "ttl_ceiling": 10}
    config = build_config(raw, "proxy.toml", ENGINES)
    orders = config.clusters["orders"]
    assert orders.endpoints == {"writer": ("writer.orders.lab", 5432), "reader": ("reader.orders.lab", 6000)}
    assert orders.dns.nameserver == ("127.0.0.1", 5353) and orders.dns.ttl_floor == 1.0
    raw["clusters"]["orders"]["dns"]["ttl_floor"] = 60
    raw["clusters"]["orders"]["endpoints"]["primary"] = "x:1"
    with pytest.raises(ConfigError) as info:
        build_config(raw, "proxy.toml", ENGINES)
    assert {p.split(":")[0] for p in info.value.problems} >= {"clusters.orders.dns.ttl_floor",
                                                              "clusters.orders.endpoints.primary"}
