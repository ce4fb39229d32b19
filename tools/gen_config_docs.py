"""Rewrites the generated part of docs/configuration.md from the settings declared in multiproxy/config.py."""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multiproxy.config import settings_reference  # noqa: E402

MARKER = "## Every setting\n\n"
doc_path = ROOT / "docs" / "configuration.md"
text = doc_path.read_text()
head = text.split(MARKER)[0]
doc_path.write_text(head + MARKER + settings_reference())
print(f"wrote {doc_path}")
