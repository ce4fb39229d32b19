"""multiproxy_echo: the EchoDB engine plugin for multiproxy, a small but complete example of the engine contract.

multiproxy finds `EchoEngine` through the entry point this distribution declares in the group
`multiproxy.engines` (see pyproject.toml); a cluster then says `engine = "echo"`.
"""
from __future__ import annotations

import secrets

from multiproxy.engine import BackendTarget, ClientContext, Engine, ErrorKind

from .backend import EchoCancel, EchoLogin, EchoServerState
from .client import EchoClient, render_error

__all__ = ["EchoEngine", "EchoClient", "EchoLogin", "EchoCancel", "EchoServerState"]
__version__ = "0.1.0"


class EchoEngine(Engine):
    """Everything multiproxy needs to know about EchoDB. The class attributes are checked when the plugin loads:
    `name` must equal the entry point's name and `default_port` must be a TCP port."""

    name = "echo"
    default_port = 7878
    description = "EchoDB line protocol (example plugin)"
    # `auth` values its listeners accept: trust, or a password checked against the users file's verifiers.
    client_auth_methods = ("trust", "scram-sha-256", "md5")

    def client_protocol(self, ctx: ClientContext) -> EchoClient:
        """One protocol object per client connection."""
        return EchoClient(ctx)

    def backend_login(self, target: BackendTarget) -> EchoLogin:
        """How the pool logs a new backend connection in."""
        return EchoLogin(target)

    def cancel_script(self, target: BackendTarget, server_state: EchoServerState) -> EchoCancel:
        """How to interrupt what the backend connection `server_state` runs (a client sent CANCEL)."""
        return EchoCancel(server_state)

    def render_error(self, kind: ErrorKind, message: str) -> bytes:
        """Errors where no client protocol object exists yet (e.g. too many connections at accept)."""
        return render_error(kind, message)

    def new_cancel_key(self, counter: int, worker: int):
        """The key a client gets in its OK line: (session id, secret). The id says which worker issued it
        (the high bits, as the default does); the random secret makes keys impossible to guess."""
        return ((worker & 0x7F) << 24) | (counter & 0xFFFFFF), secrets.randbits(31)

    def cancel_key_worker(self, key) -> int:
        return (key[0] >> 24) & 0x7F
