"""The embedded lab: private database servers on loopback, a generated proxy config, and `multiproxy lab`.

An optional part of multiproxy (`pip install 'multiproxy[lab]'`): the core never imports it, `multiproxy lab`
loads it on demand. Importing this package itself loads nothing beyond the standard library.
"""
from __future__ import annotations

import importlib.util

# What the lab extra brings (setup.py's extras_require["lab"]): the TDS lab server's T-SQL to SQLite
# translation and its self-signed certificate.
REQUIREMENTS = ("sqlglot", "cryptography")
INSTALL_HINT = "pip install 'multiproxy[lab]'"


def missing_requirements() -> list[str]:
    """The lab's own dependencies that cannot be imported here (looked up, not imported)."""
    missing = []
    for name in REQUIREMENTS:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken or blocked package
            found = False
        if not found:
            missing.append(name)
    return missing
