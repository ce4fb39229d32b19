"""TLS on memory buffers, sans-IO: an ssl.SSLObject between an incoming and an outgoing ssl.MemoryBIO.

TDS 7.x carries the TLS handshake inside PRELOGIN packets and, after it, TLS records either raw on the socket or
not at all (login-only encryption), so its users (the TDS engine's client and backend legs, the TDS lab server)
cannot hand the socket to `ssl`; they move bytes in and out of this object instead. Nothing here touches a socket.
"""
from __future__ import annotations

import ssl


class MemoryTLS:
    """One TLS session over memory BIOs. Bytes from the peer go in through `handshake` (during the handshake) or
    `decrypt` (after it); bytes for the peer come out of `pending_output` (handshake records, alerts) and `encrypt`.

    `ssl.SSLError` and its subclasses propagate to the caller, who knows how to report them; after a failed handshake `pending_output()` holds the alert that
    OpenSSL wrote for the peer, if any."""

    __slots__ = ("incoming", "outgoing", "session")

    def __init__(self, context: ssl.SSLContext, server_side: bool = False, server_hostname: str | None = None):
        self.incoming = ssl.MemoryBIO()         # from the peer, not yet read by the session
        self.outgoing = ssl.MemoryBIO()         # written by the session, not yet sent to the peer
        self.session = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                        server_hostname=server_hostname)

    def handshake(self, data: bytes = b"") -> bool:
        """Feed handshake bytes from the peer (none to start a client's handshake) and advance the handshake; True
        once it is complete. What to send to the peer is then in `pending_output()`."""
        if data:
            self.incoming.write(data)
        try:
            self.session.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def encrypt(self, data: bytes) -> bytes:
        """The TLS records carrying `data`."""
        self.session.write(data)
        return self.outgoing.read()

    def decrypt(self, data: bytes) -> bytes:
        """The plaintext of the whole records received so far (`data` and what was kept from earlier calls); a
        partial record is kept for the next call."""
        self.incoming.write(data)
        plain = bytearray()
        while True:
            try:
                chunk = self.session.read(65536)
            except ssl.SSLWantReadError:
                break
            if not chunk:
                break
            plain += chunk
        return bytes(plain)

    def pending_output(self) -> bytes:
        """What the session wrote for the peer and nobody sent yet (handshake records, an alert); emptied."""
        return self.outgoing.read()

    @property
    def buffered(self) -> int:
        """Bytes waiting in the two BIOs: from the peer and not read by OpenSSL yet (which keeps a partial record
        it has read in its own buffer), for the peer and not taken yet."""
        return self.incoming.pending + self.outgoing.pending
