"""Makes the built-in engines' installed name, `multiproxy_engines`, this checkout's `engines/`, in the test process and the processes tests start.

setup.py installs engines/ as the package multiproxy_engines; an editable install maps that name to the folder of
the checkout it was installed from. Tests of another checkout (a git worktree) would otherwise import `multiproxy`
from themselves and the engines from that other folder. A directory holding only a `multiproxy_engines` link to this
checkout's engines/ goes first on sys.path and on PYTHONPATH (which the proxies, CLIs and tools tests start inherit).
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def engines_link_dir() -> str:
    """A directory (per checkout, in the temporary directory) whose `multiproxy_engines` links to its engines/."""
    engines = os.path.join(CHECKOUT, "engines")
    tag = hashlib.sha256(CHECKOUT.encode()).hexdigest()[:12]
    directory = os.path.join(tempfile.gettempdir(), f"multiproxy-engines-{tag}")
    os.makedirs(directory, exist_ok=True)
    link = os.path.join(directory, "multiproxy_engines")
    if not (os.path.islink(link) and os.readlink(link) == engines):
        temporary = f"{link}.{os.getpid()}"
        os.symlink(engines, temporary)
        os.replace(temporary, link)       # atomic: a parallel run sees the old link or the new one
    return directory


if "multiproxy_engines" not in sys.modules:
    _directory = engines_link_dir()
    sys.path.insert(0, _directory)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_directory, os.environ.get("PYTHONPATH")) if p)
