"""TDS (SQL Server) wire code, sans-IO (no sockets), used by the TDS engine and the TDS lab server:

- `messages`: packet framing (headers, `MessageReader`, `encode_message`) and the client messages PRELOGIN, LOGIN7,
  SQLBatch, RPC and transaction manager requests;
- `token_stream`: data types (TYPE_INFO and values), token builders and the token reader;
- `response_scanner`: incremental scanning of server responses for token boundaries, and re-framing;
- `memory_tls`: `MemoryTLS`, TLS over memory BIOs (TDS carries the handshake inside PRELOGIN packets).
"""
