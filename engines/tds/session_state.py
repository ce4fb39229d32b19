"""A TDS client's session state, kept so that it can move between pooled backends.

Its database, the SET options it set (tracked once the server accepted them), what pins it, what each request does
to that once it reaches a backend, resets the client asks for (sp_reset_connection, the RESETCONNECTION and
RESETCONNECTIONSKIPTRAN status bits), and the replay that brings a freshly linked backend to the client's state.
"""
from __future__ import annotations

from .pinning import classify_batch, classify_rpc
from .wire import messages as tp
from .wire.token_stream import ProtocolError

PIN, SET, RESET = "pin", "set", "reset"
RESET_PROCEDURE = "sp_reset_connection"


def request_effects(msg: tp.Message, virtualised: bool = True) -> list[tuple]:
    """What one request does to the session: (RESET, keeps_transaction) first when it asks for a reset, then
    (PIN, reason, detail) and (SET, option, statement to replay)."""
    effects: list[tuple] = []
    if msg.status & (tp.STATUS_RESETCONNECTION | tp.STATUS_RESETCONNECTIONSKIPTRAN):
        effects.append((RESET, bool(msg.status & tp.STATUS_RESETCONNECTIONSKIPTRAN)))
    try:
        if msg.type == tp.SQL_BATCH:
            text = tp.SqlBatch.decode(msg.data).text
            reasons, tracked = classify_batch(text)
            effects += [(PIN, reason, detail, text[:500]) for reason, detail in reasons]
            effects += [(SET, name, statement) for name, statement in tracked.items()]
        elif msg.type == tp.RPC:
            for call in tp.RpcRequest.decode(msg.data).calls:
                if call.name.lower().rsplit(".", 1)[-1].strip("[]") == RESET_PROCEDURE:
                    effects.append((RESET, False))
                    continue
                effects += [(PIN, reason, detail, f"RPC {call.name}")
                            for reason, detail in classify_rpc(call.name, call.params, virtualised)]
    except (ProtocolError, UnicodeDecodeError):
        pass            # the backend refuses it with its own error
    return effects


class SessionState:
    """Mixin of TDSClient: the state that follows the client from backend to backend. TDSClient sets `options`,
    `pin_reasons`, `database` and `login_state` (the database and options its login gave it, LOGIN7's
    language among them)."""

    def _on_sent(self, entry) -> None:
        """The request reached a backend: its pins and resets take effect (its SET options wait for the answer)."""
        entry.sent = True
        if entry.effects:
            self.state_generation += 1
        for effect in entry.effects:
            if effect[0] == PIN:
                if self.ctx.pin_policy.detected(self, effect[1], effect[2], effect[3] if len(effect) > 3 else ""):
                    self.pinned = True
                    self.pin_reasons.add(effect[1])
            elif effect[0] == RESET:
                self._client_reset(keeps_transaction=effect[1])

    def _on_answered(self, entry, failed: bool) -> None:
        """The server answered the request: SET options it accepted are tracked (replayed on the next backends)."""
        if failed or not entry.effects:
            return
        self.state_generation += 1
        for effect in entry.effects:
            if effect[0] == SET:
                self.options.pop(effect[1], None)
                self.options[effect[1]] = effect[2]

    def _client_reset(self, keeps_transaction: bool) -> None:
        """The client reset its session: SET options and database are the login's again, nothing it did pins it
        any more (temporary tables, cursors, prepared handles, locks, context, impersonation all end with a
        reset), the backend's prepared statements are gone, and unless the reset keeps the transaction, the open
        one is rolled back."""
        self.state_generation += 1
        self.database, options = self.login_state
        self.options = dict(options)
        for reason in list(self.pin_reasons):
            self.ctx.pin_policy.released(self, reason)
        self.pin_reasons.clear()
        self.pinned = False
        if self.linked:
            self.server_state.statements.clear()    # SQL Server drops the connection's prepared handles
            self.server_state.options = None        # back to the backend login's options: the proxy cannot name them
        if not keeps_transaction:
            self.in_transaction = False
            self.descriptor = b""
            self.local_descriptor = b""
            self.lazy_begin = None

    def _replay_statements(self, backend_database: str) -> list[str]:
        """What brings a backend in `backend_database` to this client's database and SET options."""
        replay = list(self.options.values())
        if self.database and self.database.lower() != backend_database.lower():
            replay.insert(0, f"USE [{self.database.replace(']', ']]')}]")
        return replay
