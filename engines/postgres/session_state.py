"""A PostgreSQL client's session state, kept so that it can move between pooled backends.

What the client believes its reported parameters are (ParameterStatus), the unreported settings it asked for
at startup (options -c ...) or set itself (CLIENT_OWNED), the greeting it gets at login, and the replay that
brings a freshly linked backend to that state (set_config as an internal request) or resets one.
"""
from __future__ import annotations

import shlex

from . import protocol as p
from .pinning import IDENTITY_PARAMETERS, REPORTED_PARAMETERS, TRANSACTION_SCOPED
from .relay import BACKEND_RESET, INTERNAL, LOGIN_VALUES, READ_ONLY_WORDS, READBACK

# Parameters a client cannot choose; the server reports them and they are never replayed.
FIXED_PARAMETERS = frozenset({
    "server_version", "server_encoding", "integer_datetimes", "is_superuser", "session_authorization",
    "in_hot_standby",
})
STARTUP_ONLY = frozenset({"user", "database", "options", "replication"})
# Reported parameters the server may also change by itself (a DBA making a node read-only with ALTER SYSTEM
# and a reload): tracked for a client only when the client set them (startup option, SET, RESET), so the
# node's own value is never replayed elsewhere nor overridden.
CLIENT_OWNED = frozenset({"default_transaction_read_only"})

_TRUE_WORDS = frozenset(("on", "true", "yes", "1", "t", "y"))


def _spelling(value: str) -> str:
    """A value as the server compares it: 'utf-8', "'utf-8'" (asyncpg's) and UTF8 are one encoding (PostgreSQL
    drops all but letters and digits of an encoding's name); 'iso, mdy' is ISO, MDY."""
    return "".join(ch for ch in value.lower() if ch.isalnum())


def resets_statements(reset_query: str) -> bool:
    """Whether the backend reset deallocates prepared statements (DISCARD ALL, the default, does)."""
    low = reset_query.lower()
    return not low or "discard all" in low or "deallocate all" in low


def replay_statements(client_params: dict, params: dict, client_settings: dict, settings: dict) -> list[str]:
    """The SQL that brings a backend holding `params` (reported) and `settings` (tracked) to the client's:
    session identity first (SET SESSION AUTHORIZATION resets the role, and the other settings are then made
    as the client's role would make them), RESET of what an earlier client set, then one set_config per value."""
    statements = []
    want_user = client_settings.get("session_authorization")
    want_role = client_settings.get("role")
    have_role = settings.get("role")
    if want_user != settings.get("session_authorization"):
        statements.append("RESET SESSION AUTHORIZATION" if want_user is None
                          else f"SET SESSION AUTHORIZATION {p.quote_literal(want_user)}")
        have_role = None
    if want_role != have_role:
        statements.append("RESET ROLE" if want_role is None else f"SET ROLE {p.quote_literal(want_role)}")
    assignments = [(low, value) for low, value in client_params.items()
                   if low not in FIXED_PARAMETERS and params.get(low) != value]
    if client_settings != settings:
        assignments += [(low, value) for low, value in client_settings.items()
                        if low not in IDENTITY_PARAMETERS and settings.get(low) != value]
        # Settings an earlier client of this backend made, that this client never asked for.
        statements += [f"RESET {p.quote_ident(low)}" for low in settings
                       if low not in client_settings and low not in IDENTITY_PARAMETERS]
    if assignments:
        # set_config parses values as the startup packet's -c does (lists such as search_path stay lists).
        statements.append("SELECT " + ", ".join(
            f"pg_catalog.set_config({p.quote_literal(low)}, {p.quote_literal(value)}, false)"
            for low, value in assignments))
    return statements


def parse_options(options: str) -> dict[str, str]:
    """The `-c name=value` and `--name=value` settings inside the startup `options` parameter."""
    return split_options(options)[0]


def split_options(options: str) -> tuple[dict[str, str], list[str]]:
    """The startup `options` parameter as (settings to replay, words that are no setting). Only settings can
    follow a client from backend to backend; anything else (postgres's -d, -e, -B ...) is refused at login."""
    out: dict[str, str] = {}
    refused: list[str] = []
    try:
        words = shlex.split(options.replace("\\ ", "\x00"))
    except ValueError:
        return out, [options]
    words = [w.replace("\x00", " ") for w in words]
    i = 0
    while i < len(words):
        word = words[i]
        setting = None
        if word == "-c" and i + 1 < len(words):
            setting = words[i + 1]
            i += 1
        elif word.startswith("-c"):
            setting = word[2:]
        elif word.startswith("--"):
            setting = word[2:]
        if setting and "=" in setting:
            name, value = setting.split("=", 1)
            out[name.replace("-", "_").lower()] = value
        else:
            refused.append(setting if setting else word)
        i += 1
    return out, refused


class SessionState:
    """Mixin of PostgresClient: the session parameters and settings that follow the client from backend to
    backend. PostgresClient.__init__ creates `client_params`, `client_settings` and `canonical`."""

    owns_read_only = False          # the client has set (or reset) default_transaction_read_only itself
    server_params: dict | None = None   # the linked backend's parameter values
    pending_settings: dict | None = None  # the backend's unreported settings once the proxy's SETs succeed
    internal_failed = False         # the proxy's own SETs (or reset) got an ErrorResponse

    def login_complete(self, server_state) -> bytes:
        """AuthenticationOk, the parameters as this client should see them, its cancel key, ReadyForQuery."""
        # Clients of one pool mostly send the same startup packet: greet them from a cache keyed by its bytes.
        cache = server_state.welcome_cache
        cached = cache.get(self.startup_body)
        if cached is None:
            cached = self._greeting(server_state)
            if len(cache) < 128:
                cache[self.startup_body] = cached
        self.client_params = dict(cached[1])
        self.client_settings = dict(cached[2])
        if self.ctx.read_only and "default_transaction_read_only" not in self.client_settings:
            # A reader listener's sessions are read-only on whichever node serves them (the writer too, when
            # readers fall back to it); the client may still turn that off for itself.
            self.client_settings["default_transaction_read_only"] = "on"
        if CLIENT_OWNED.intersection(self.client_settings):
            self.owns_read_only = True
        # What RESET ALL and DISCARD ALL return to: the values chosen at login, as on a server.
        self.startup_settings = dict(self.client_settings)
        self.startup_reported = cached[3]
        self.canonical = server_state.canonical
        pid, secret = self.ctx.cancel_key
        return cached[0] + p.backend_key_data(pid, secret) + p.READY_IDLE

    def _greeting(self, server_state) -> tuple:
        """(AuthenticationOk and ParameterStatus bytes, reported parameters, unreported settings, the reported
        parameters the startup packet chose) for this client."""
        wanted = {}
        for key, value in self.startup_params.items():
            low = key.lower()
            if low == "options":
                wanted.update(parse_options(value))
            elif low not in STARTUP_ONLY:
                wanted[low] = value
        out = [p.authentication(p.AUTH_OK)]
        client_params = {}
        client_settings = {}
        chosen = {}
        for low, value in server_state.login_params.items():
            if low in wanted and low not in FIXED_PARAMETERS:
                # Chosen unless the backend's login gives it already ('utf-8' is 'UTF8'): then the client has the
                # backend's spelling, as the server reports it (a replay would never make 'utf-8' of it, and the
                # relay's lanes compare the two)
                same = (wanted[low] == value if low == "application_name"
                        else _spelling(wanted[low]) == _spelling(value))
                if low in CLIENT_OWNED or not same:
                    if low not in CLIENT_OWNED:
                        chosen[low] = wanted[low]
                    value = wanted[low]
            if low not in CLIENT_OWNED:
                client_params[low] = value
            out.append(p.parameter_status(server_state.canonical.get(low, low), value))
        for low, value in wanted.items():
            if (low not in server_state.login_params or low in CLIENT_OWNED) and low not in FIXED_PARAMETERS:
                client_settings[low] = value
        return b"".join(out), client_params, client_settings, chosen

    def _asks_read_only(self, request: bytes) -> bool:
        """Whether the session itself wants read-only transactions (its setting, or the request's words): then a
        read-only refusal is its own doing, says nothing about the node, and goes back to it as it is."""
        for source in (self.client_params, self.client_settings):
            for name in ("default_transaction_read_only", "transaction_read_only"):
                value = source.get(name)
                if value is not None and value.lower() in _TRUE_WORDS:
                    return True
        if self.lazy_begin is not None and READ_ONLY_WORDS.search(self.lazy_begin):
            return True
        return READ_ONLY_WORDS.search(request) is not None

    def _internal_done(self) -> None:
        """The proxy's own SETs finished: record the settings they made, unless they failed (then none took)."""
        if self.pending_settings is not None and not self.internal_failed and self.server_state is not None:
            self.server_state.settings = self.pending_settings
        self.pending_settings = None
        self.internal_failed = False

    def _parameter_status(self, data: bytes, start: int, end: int, backend_only: bool = False) -> None:
        try:
            name_end = data.index(b"\x00", start, end)
            value_end = data.index(b"\x00", name_end + 1, end)
        except ValueError:
            return
        name = data[start:name_end].decode("utf-8", "replace")
        value = data[name_end + 1:value_end].decode("utf-8", "replace")
        low = name.lower()
        self.canonical.setdefault(low, name)
        if self.server_params is not None:
            self.server_params[low] = value
        if backend_only:                # the reset of reset_after_transaction: the client's values are replayed
            return
        if low in CLIENT_OWNED:
            # The client's own doing only if it touched the setting; otherwise the node changed it itself.
            if self.owns_read_only:
                if self.client_settings.get(low) != value:
                    self.state_generation += 1
                self.client_settings = {**self.client_settings, low: value}
                if self.server_state is not None:
                    self.server_state.settings = {**self.server_state.settings, low: value}
            return
        if self.client_params.get(low) != value:
            self.state_generation += 1      # a replay on a new backend reports what the client has: no change
        self.client_params[low] = value

    def _follow_up(self, forward: bytes) -> bytes:
        """The client's request, then what the proxy asks right behind it in the same borrow: the startup values
        again after RESET ALL / DISCARD ALL (which reset a backend to its own login values, not the client's),
        and the read-back of values only the server knows."""
        if self.startup_replay_due:
            self.startup_replay_due = False
            values = {**self.startup_reported, **self.startup_settings}
            forward += p.query("SELECT " + ", ".join(
                f"pg_catalog.set_config({p.quote_literal(low)}, {p.quote_literal(value)}, false)"
                for low, value in values.items()))
            self.fifo.append(LOGIN_VALUES)
        if self.readback_due is not None:
            forward = self._with_readback(forward)
        return forward

    def _want_readback(self, name: str | None) -> None:
        """The request being read sets `name` (None: some setting) to a value only the server knows."""
        if self.readback_due is None:
            self.readback_due = set()
        self.readback_due.add(name)
        if name == "session_authorization":
            self.readback_due.add("role")          # a new session user has no role set

    def _with_readback(self, forward: bytes) -> bytes:
        """The client's request, then the proxy's read-back of what it set (answer swallowed, see _read_back)."""
        names, self.readback_due = self.readback_due, None
        known = sorted(name for name in names if name is not None)
        parts = []
        if known:
            parts.append("SELECT n, pg_catalog.current_setting(n, true) FROM pg_catalog.unnest(ARRAY["
                         + ", ".join(p.quote_literal(name) for name in known) + "]::text[]) AS n")
        if None in names:
            parts.append("SELECT name, pg_catalog.current_setting(name) FROM pg_catalog.pg_settings "
                         "WHERE source = 'session'")
        self.fifo.append(READBACK)
        return forward + p.query(" UNION ALL ".join(parts))

    def _read_back_row(self, data: bytes, start: int, end: int) -> None:
        """A DataRow of the read-back: (name, value), value None when the setting does not exist."""
        try:
            columns = []
            pos = start + 2
            for _ in range(2):
                length = p.INT32.unpack_from(data, pos)[0]
                pos += 4
                columns.append(None if length < 0 else data[pos:pos + length].decode("utf-8", "replace"))
                pos += max(length, 0)
        except Exception:  # noqa: BLE001  a row not of this shape is no answer to the read-back
            return
        if self.readback_rows is None:
            self.readback_rows = []
        self.readback_rows.append(columns)

    def _read_back(self) -> None:
        """The read-back ended: track what the server holds, as if the client had set it literally."""
        rows, self.readback_rows = self.readback_rows, None
        if rows is None:
            return
        for name, value in rows:
            if name is None:
                continue
            low = name.lower()
            if (low in REPORTED_PARAMETERS and low not in IDENTITY_PARAMETERS) or low in TRANSACTION_SCOPED:
                continue            # ParameterStatus told the client already; or gone with the transaction
            if value is None or (low == "role" and value == "none"):
                self._track_setting(low, None)
            else:
                self._track_setting(low, value)
        if self.tx_status == p.TX_IDLE and self.settings_before is not None:
            self._settings_settled()

    def _reset_failed(self, body: bytes) -> bytes:
        """The reset before this link (reset_after_transaction) failed: the client is warned, its request goes on."""
        text = p.parse_fields(body).get("M", "unknown error")
        return p.notice_response("01000", "multiproxy could not reset the pooled connection before your transaction "
                                 f"(clusters.*.backend.reset_query): {text}; fix the reset query", "WARNING")

    def _replay_failed(self, body: bytes) -> bytes:
        """A replayed setting failed on the new backend: tell the client as a warning and stop replaying it."""
        fields = p.parse_fields(body)
        text = fields.get("M", "unknown error")
        for low in list(self.client_settings):
            if low in text.lower():
                del self.client_settings[low]
        return p.notice_response("01000", f"multiproxy could not apply your session setting on a pooled connection: {text}",
                                 "WARNING")

    def link(self, server_state, data: bytes) -> bytes:
        """What to send to a freshly linked backend: with reset_after_transaction the reset first, then the
        statements bringing the backend to this client's tracked identity, parameters and settings (internal
        requests), a BEGIN the proxy answered for it, then the client's bytes (statement names mapped if needed)."""
        self.linked = True
        self.server_state = server_state
        params = server_state.params
        self.server_params = params
        if self.deferred is not None:
            self._apply_deferred()
        if self.deferred_rewrite is not None:
            start, group = self.deferred_rewrite
            self.deferred_rewrite = None
            data = self._rewrite_statements(data, start, group)
        if self.lazy_begin is not None:
            data = self._begin_with(data)
        reset = b""
        if self.ctx.reset_after_transaction:
            # The reset leaves the backend as its login did: replay against that, not against what it held.
            reset = p.query(self.ctx.reset_query or "DISCARD ALL")
            server_state.settings = {}
            if resets_statements(self.ctx.reset_query):
                server_state.prepared.clear()
            params = server_state.login_params
        settings = server_state.settings
        statements = []
        if not (self.client_params.items() <= params.items() and self.client_settings == settings):
            statements = replay_statements(self.client_params, params, self.client_settings, settings)
            self.pending_settings = dict(self.client_settings) if self.client_settings != settings else None
        if statements:
            self.fifo.appendleft(INTERNAL)
            data = p.query(";".join(statements)) + data
        if reset:
            self.fifo.appendleft(BACKEND_RESET)
            data = reset + data
        return data

    def reset_bytes(self, server_state, reset_query: str = "") -> bytes:
        """Reset a backend leaving a pinned session: DISCARD ALL (or the configured query) as an internal request."""
        server_state.settings = {}
        if resets_statements(reset_query):
            server_state.prepared.clear()
        self.fifo.append(INTERNAL)
        return p.query(reset_query or "DISCARD ALL")
