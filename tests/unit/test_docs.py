"""Documentation stays true: the configuration reference and the plugin contract table say what the code declares."""
import pathlib

from multiproxy.config import settings_reference
from multiproxy.contract import contract_reference

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_configuration_reference_matches_the_declared_settings():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert settings_reference() in doc, "regenerate the reference: python3 tools/gen_config_docs.py"


def test_plugin_guide_shows_the_contract_as_the_code_declares_it():
    doc = (ROOT / "docs" / "plugins.md").read_text()
    assert contract_reference() in doc, "regenerate the contract table: python3 tools/gen_config_docs.py"
