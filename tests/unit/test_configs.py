"""Every example in configs/ is a valid configuration for the engines that are installed."""
import pathlib

import pytest

from multiproxy.config import load_config
from multiproxy.plugins import load_engines

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[2] / "configs").glob("*.toml"))


def test_there_are_examples():
    names = {path.name for path in CONFIGS}
    assert {"lab-postgres.toml", "aurora-postgres.toml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_is_valid(path):
    engines = {name: loaded.engine for name, loaded in load_engines().items()}
    config = load_config(str(path), engines)
    assert config.listeners, f"{path.name}: no listeners"
    for listener in config.listeners:
        assert listener.cluster in config.clusters


def test_the_lab_example_is_what_the_lab_generates():
    """configs/lab-postgres.toml (annotated for people) holds the settings `multiproxy lab up` writes for its
    PostgreSQL part, with the example's fixed ports: the lab's generator is the one source of both."""
    import tomllib
    from types import SimpleNamespace

    from multiproxy.lab.parts import PARTS, proxy_toml

    part = PARTS["postgres"]("/nonexistent", "lab", "unused", "lab", detach=False)
    part.primary = SimpleNamespace(port=5432)
    part.dns_nameserver = "127.0.0.1:5353"
    generated = (proxy_toml("127.0.0.1:9930", "users.toml")
                 + part.config_toml("127.0.0.1:6432", "127.0.0.1:6433", "lab-password"))
    example = CONFIGS[[p.name for p in CONFIGS].index("lab-postgres.toml")]
    assert tomllib.loads(example.read_text()) == tomllib.loads(generated)
