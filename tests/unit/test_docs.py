"""Documentation stays true: the configuration reference lists every declared setting as the code declares it."""
import pathlib

from multiproxy.config import settings_reference

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_configuration_reference_matches_the_declared_settings():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert settings_reference() in doc, "regenerate the reference: python3 tools/gen_config_docs.py"
