"""The engine contract test kit: checks any engine (built-in or third-party) against the plugin contract, sans-IO.

Plugin authors run it on theirs: `from multiproxy.contract import check_engine; assert not check_engine(MyEngine())`.
The project's own suite runs it over every engine found through the entry point.
"""
from __future__ import annotations

import random

from .config import build_config
import inspect

from .engine import (
    AuthFailed, Authenticated, BackendScript, BackendTarget, CancelRequested, ClientContext, ClientProtocol,
    CloseClient, Engine, ErrorKind, ProtocolError, SendToClient, StartClientTLS, contract_methods,
)
from .pinning import PinPolicy

# Derived from the contract itself: the methods marked @contract on ClientProtocol, and its attributes.
CLIENT_METHODS = contract_methods()
CLIENT_ATTRIBUTES = ("pinned", "requests", "backend_owed")
HANDSHAKE_EVENTS = (SendToClient, StartClientTLS, Authenticated, CancelRequested, CloseClient, AuthFailed)


def contract_context(engine: Engine, auth: str = "trust") -> ClientContext:
    """A ClientContext as the core would build it, for a listener of this engine."""
    from .auth import UsersFile
    config = build_config({
        "clusters": {"c": {"engine": engine.name, "hosts": [f"127.0.0.1:{engine.default_port}"]}},
        "listeners": [{"name": "l", "listen": "127.0.0.1:1", "cluster": "c", "auth": auth}],
        "auth": {"users_file": "users.toml"} if auth != "trust" else {},
    })
    return ClientContext(listener=config.listeners[0], users=UsersFile.empty(), tls_available=False,
                         cancel_key=engine.new_cancel_key(1, 0), pin_policy=PinPolicy(), max_message_size=1 << 20)


def check_engine(engine: Engine, garbage_rounds: int = 200, seed: int = 1) -> list[str]:
    """Every way `engine` breaks the contract, as sentences; an empty list means it passes."""
    problems: list[str] = []
    name = getattr(engine, "name", "?")

    def problem(text):
        problems.append(f"engine {name!r}: {text}")

    if not isinstance(engine, Engine):
        return [f"engine {name!r}: is not an instance of multiproxy.engine.Engine"]
    if not engine.name or not isinstance(engine.default_port, int) or not 0 < engine.default_port < 65536:
        problem("needs a name and a default_port between 1 and 65535")
    if not engine.description:
        problem("has no description (shown by `multiproxy engines`)")

    for kind in ErrorKind:
        try:
            data = engine.render_error(kind, "contract check")
        except Exception as exc:
            problem(f"render_error({kind.value}) raised {type(exc).__name__}: {exc}")
            continue
        if not isinstance(data, (bytes, bytearray)) or not data:
            problem(f"render_error({kind.value}) must return non-empty bytes")

    if not isinstance(getattr(engine, "supports_token_auth", False), bool):
        problem("supports_token_auth must be True or False")
    reasons = getattr(engine, "pin_reasons", ())
    if not isinstance(reasons, tuple) or not all(isinstance(r, str) and r for r in reasons):
        problem("pin_reasons must be a tuple of reason names (strings)")
    methods = getattr(engine, "client_auth_methods", ())
    if not isinstance(methods, tuple) or "trust" not in methods:
        problem("client_auth_methods must be a tuple of auth method names including 'trust'")
    try:
        found = engine.listener_problems(dict(vars(contract_context(engine).listener)))
        if not isinstance(found, list) or not all(
                isinstance(f, tuple) and len(f) == 2 and all(isinstance(x, str) for x in f) for f in found):
            problem(f"listener_problems(settings) must return a list of (setting, message) pairs, got {found!r}")
    except Exception as exc:
        problem(f"listener_problems(settings) raised {type(exc).__name__}: {exc}")

    keys = {engine.new_cancel_key(i, 0) for i in range(1, 50)}
    if len(keys) != 49:
        problem("new_cancel_key must give distinct keys for distinct counters")
    try:
        hash(next(iter(keys)))
    except TypeError:
        problem("new_cancel_key must return a hashable key")

    try:
        proto = engine.client_protocol(contract_context(engine))
    except Exception as exc:
        problem(f"client_protocol(ctx) raised {type(exc).__name__}: {exc}")
        return problems
    if not isinstance(proto, ClientProtocol):
        problem("client_protocol(ctx) must return a multiproxy.engine.ClientProtocol")
    for method in CLIENT_METHODS:
        own = getattr(type(proto), method, None)
        if not callable(own) or own is getattr(ClientProtocol, method):
            problem(f"its client protocol lacks method {method}() (see multiproxy.engine.ClientProtocol)")
            continue
        wanted = inspect.signature(getattr(ClientProtocol, method))
        try:
            inspect.signature(own).bind(*[None] * sum(1 for p in wanted.parameters.values() if p.default is p.empty))
        except TypeError:
            problem(f"its client protocol's {method}{inspect.signature(own)} does not accept the contract's "
                    f"arguments {wanted}")
    for attribute in CLIENT_ATTRIBUTES:
        if not hasattr(proto, attribute):
            problem(f"its client protocol lacks attribute {attribute}")
    if problems:
        return problems

    greeting = proto.start()
    if not isinstance(greeting, (bytes, bytearray)):
        problem("ClientProtocol.start() must return bytes")
    if type(proto).handover_state is not ClientProtocol.handover_state:
        # A takeover (multiproxy.takeover) moves only logged-in clients, and the new process must resume them.
        if type(engine).resume_client is Engine.resume_client:
            problem("its client protocol exports sessions (handover_state) but the engine cannot resume them "
                    "(Engine.resume_client)")
        try:
            if proto.handover_state() is not None:
                problem("handover_state() of a client still logging in must be None")
        except Exception as exc:
            problem(f"handover_state() raised {type(exc).__name__}: {exc}")

    rng = random.Random(seed)
    for _ in range(garbage_rounds):
        fresh = engine.client_protocol(contract_context(engine))
        fresh.start()
        blob = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
        try:
            events = fresh.receive_handshake(blob)
        except ProtocolError:
            continue
        except Exception as exc:
            problem(f"receive_handshake({blob!r}) raised {type(exc).__name__}: {exc}; only ProtocolError is allowed")
            break
        if not isinstance(events, list) or any(not isinstance(e, HANDSHAKE_EVENTS) for e in events):
            problem(f"receive_handshake must return a list of handshake events, got {events!r}")
            break

    target = BackendTarget(host="127.0.0.1", port=engine.default_port, user="u", database="d", password="p",
                           tls="disable")
    try:
        script = engine.backend_login(target)
    except Exception as exc:
        problem(f"backend_login(target) raised {type(exc).__name__}: {exc}")
        return problems
    if not isinstance(script, BackendScript):
        problem("backend_login(target) must return a multiproxy.engine.BackendScript")
    else:
        first = script.start()
        if not isinstance(first, (bytes, bytearray)):
            problem("BackendScript.start() must return bytes")
    return problems


def contract_reference() -> str:
    """The client-protocol contract as Markdown, from the code (docs/plugins.md embeds it; a test keeps it true)."""
    from . import engine as e
    lines = ["| method | required | what the core calls it for |", "|---|---|---|"]
    for name, value in vars(ClientProtocol).items():
        if name.startswith("_") or not callable(value):
            continue
        signature = str(inspect.signature(value)).replace("(self, ", "(").replace("(self)", "()").replace("'", "")
        doc = " ".join((value.__doc__ or "").split())
        lines.append(f"| `{name}{signature}` | {'yes' if getattr(value, '__contract__', False) else 'no'} | {doc} |")
    lines += ["", "Outcomes of `backend_data`: "
              + ", ".join(f"`{n}` = {getattr(e, n)}" for n in ("KEEP", "RELEASE", "HELD_REFUSAL")) + ".",
              "", "Attributes the core reads: " + ", ".join(f"`{a}`" for a in CLIENT_ATTRIBUTES) + "."]
    return "\n".join(lines) + "\n"
