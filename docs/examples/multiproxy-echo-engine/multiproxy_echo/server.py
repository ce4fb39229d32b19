"""The EchoDB example server: a tiny real TCP database the echo engine proxies to (threads, standard library only).

Run it with `python -m multiproxy_echo.server --port 7878`. Without `--user` it accepts any user and
password; with `--user NAME:PASSWORD` (repeatable) it checks them. See multiproxy_echo.protocol for the
commands and answers.
"""
from __future__ import annotations

import argparse
import itertools
import secrets
import socketserver
import sys
import threading

from .protocol import DONE_IDLE, DONE_TX, MAX_LINE, error_line

MAX_SLEEP = 60.0


class Session:
    """The state of one logged-in connection: transaction flag, variables and a cancel signal."""

    def __init__(self, session_id: int, secret: int):
        self.session_id = session_id
        self.secret = secret
        self.in_transaction = False
        self.variables: dict[str, str] = {}
        self.cancelled = threading.Event()


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, users: dict[str, str] | None = None):
        super().__init__(address, EchoHandler)
        self.users = users or {}
        self.sessions: dict[int, Session] = {}
        self.ids = itertools.count(1)
        self.lock = threading.Lock()

    def login(self, user: str, password: str) -> Session | None:
        if self.users and self.users.get(user) != password:
            return None
        with self.lock:
            session = Session(next(self.ids), secrets.randbits(31))
            self.sessions[session.session_id] = session
        return session

    def cancel(self, session_id: int, secret: int) -> None:
        with self.lock:
            session = self.sessions.get(session_id)
        if session is not None and secrets.compare_digest(str(session.secret), str(secret)):
            session.cancelled.set()

    def logout(self, session: Session) -> None:
        with self.lock:
            self.sessions.pop(session.session_id, None)


class EchoHandler(socketserver.StreamRequestHandler):
    """One connection: the first line is AUTH or CANCEL, then one answer per request line."""

    server: EchoServer

    def send(self, *lines: bytes) -> None:
        self.wfile.write(b"".join(lines))
        self.wfile.flush()

    def handle(self) -> None:
        first = self.rfile.readline(MAX_LINE)
        parts = first.decode("utf-8", "replace").split()
        if len(parts) == 3 and parts[0] == "CANCEL" and parts[1].isdigit() and parts[2].isdigit():
            self.server.cancel(int(parts[1]), int(parts[2]))
            return
        if len(parts) not in (3, 4) or parts[0] != "AUTH":
            self.send(error_line("the first line must be AUTH user password [database]"))
            return
        session = self.server.login(parts[1], parts[2])
        if session is None:
            self.send(error_line(f"password authentication failed for user {parts[1]}"))
            return
        self.send(f"OK {session.session_id} {session.secret}\n".encode())
        try:
            while True:
                line = self.rfile.readline(MAX_LINE)
                if not line or line.strip().upper() == b"QUIT":
                    return
                if not line.endswith(b"\n"):
                    self.send(error_line(f"line longer than {MAX_LINE} bytes"))
                    return
                self.send(*self.answer(session, line.decode("utf-8", "replace").rstrip("\r\n")))
        finally:
            self.server.logout(session)    # a transaction left open is rolled back with the connection

    def answer(self, session: Session, line: str) -> list[bytes]:
        """The answer lines to one request, ending with the status line."""
        command, _, rest = line.partition(" ")
        command = command.upper()
        out: list[bytes] = []
        if command == "QUERY":
            out.append(f"ROW {rest}\n".encode("utf-8"))
        elif command == "SESSION":
            out.append(f"ROW {session.session_id}\n".encode())
        elif command == "BEGIN":
            if session.in_transaction:
                out.append(error_line("there is already a transaction in progress"))
            session.in_transaction = True
        elif command in ("COMMIT", "ROLLBACK"):
            if not session.in_transaction:
                out.append(error_line("there is no transaction in progress"))
            session.in_transaction = False
        elif command == "SLEEP":
            try:
                seconds = min(float(rest), MAX_SLEEP)
            except ValueError:
                out.append(error_line(f"SLEEP needs a number of seconds, got {rest!r}"))
            else:
                session.cancelled.clear()
                if session.cancelled.wait(max(0.0, seconds)):
                    out.append(error_line("canceling statement due to user request"))
        elif command == "SET":
            name, _, value = rest.partition(" ")
            if not name:
                out.append(error_line("SET needs a name and a value"))
            else:
                session.variables[name] = value
        elif command == "GET":
            out.append(f"ROW {session.variables.get(rest, '')}\n".encode("utf-8"))
        elif command == "RESET":
            session.variables.clear()
        else:
            out.append(error_line(f"unknown command {command!r}"))
        out.append(DONE_TX if session.in_transaction else DONE_IDLE)
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multiproxy_echo.server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7878)
    parser.add_argument("--user", action="append", default=[], metavar="NAME:PASSWORD",
                        help="accept only these users (repeatable); without it any user and password")
    args = parser.parse_args(argv)
    users = {}
    for item in args.user:
        name, sep, password = item.partition(":")
        if not sep or not name:
            parser.error(f"--user wants NAME:PASSWORD, got {item!r}")
        users[name] = password
    with EchoServer((args.host, args.port), users) as server:
        print(f"EchoDB server listening on {args.host}:{server.server_address[1]}", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
