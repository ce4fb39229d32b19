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
