"""Rewrites the generated parts of the docs: docs/configuration.md from the settings declared in multiproxy/config.py,
and the client-protocol contract in docs/plugins.md from multiproxy/engine.py."""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multiproxy.config import settings_reference  # noqa: E402
from multiproxy.contract import contract_reference  # noqa: E402

MARKER = "## Every setting\n\n"
doc_path = ROOT / "docs" / "configuration.md"
text = doc_path.read_text()
head = text.split(MARKER)[0]
doc_path.write_text(head + MARKER + settings_reference())
print(f"wrote {doc_path}")

BEGIN, END = "<!-- contract: begin -->\n", "<!-- contract: end -->"
plugins = ROOT / "docs" / "plugins.md"
text = plugins.read_text()
before, rest = text.split(BEGIN)
plugins.write_text(before + BEGIN + contract_reference() + END + rest.split(END, 1)[1])
print(f"wrote {plugins}")
