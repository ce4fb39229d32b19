"""A small authoritative DNS server for labs and failover drills: A and CNAME records from a JSON zone file.

The zone file maps names to records and is re-read whenever it changes, so a drill repoints an endpoint
by rewriting the file:

    {"ttl": 5, "records": {"writer.pg.lab": {"A": ["127.0.0.1"]}, "db.lab": {"CNAME": "writer.pg.lab"}}}

Run it with `python -m multiproxy.lab.dns_server --port 5353 --zone zone.json` (loopback only).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

log = logging.getLogger("multiproxy.lab.dns")


def write_zone(path: str, records: dict, ttl: int = 5) -> None:
    """Atomically write a zone file (records: name -> {"A": [...]} or {"CNAME": target})."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"ttl": ttl, "records": records}, f)
    os.replace(tmp, path)


class Zone:
    """The records of a zone file, reloaded when the file's modification time changes."""

    def __init__(self, path: str):
        self.path = path
        self.mtime = None
        self.ttl = 5
        self.records: dict[str, dict] = {}
        self.reload_if_changed()

    def reload_if_changed(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError:
            return
        if mtime == self.mtime:
            return
        try:
            with open(self.path) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            log.warning("zone %s not reloaded: %s", self.path, exc)
            return
        self.mtime = mtime
        self.ttl = int(data.get("ttl", 5))
        self.records = {name.lower().rstrip("."): rec for name, rec in data.get("records", {}).items()}

    def answer(self, query_bytes: bytes) -> bytes | None:
        import dns.flags
        import dns.message
        import dns.name
        import dns.rcode
        import dns.rdataclass
        import dns.rdatatype
        import dns.rrset

        try:
            query = dns.message.from_wire(query_bytes)
        except Exception:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        name = question.name.to_text().lower().rstrip(".")
        found = False
        for _ in range(8):
            record = self.records.get(name)
            if record is None:
                break
            found = True
            owner = dns.name.from_text(name)
            if "CNAME" in record:
                target = record["CNAME"].rstrip(".") + "."
                response.answer.append(dns.rrset.from_text(owner, self.ttl, "IN", "CNAME", target))
                name = target.lower().rstrip(".")
                continue
            if question.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY) and record.get("A"):
                response.answer.append(dns.rrset.from_text_list(owner, self.ttl, "IN", "A", list(record["A"])))
            break
        if not found:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()


def serve(host: str, port: int, zone_path: str) -> None:
    from gevent import monkey
    monkey.patch_all()
    import gevent
    from gevent.server import DatagramServer

    zone = Zone(zone_path)

    class Server(DatagramServer):
        def handle(self, data, address):
            zone.reload_if_changed()
            reply = zone.answer(data)
            if reply is not None:
                self.socket.sendto(reply, address)

    server = Server((host, port))
    server.start()
    print(f"dns server on {host}:{server.address[1]} serving {zone_path}", flush=True)

    def watch():
        while True:
            gevent.sleep(0.2)
            zone.reload_if_changed()

    gevent.spawn(watch)
    try:
        gevent.wait()
    except KeyboardInterrupt:
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--zone", required=True, help="JSON zone file (re-read when it changes)")
    args = parser.parse_args(argv)
    if not args.host.startswith("127.") and args.host not in ("::1", "localhost"):
        print("the lab DNS server listens on loopback addresses only", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    serve(args.host, args.port, args.zone)
    return 0


if __name__ == "__main__":
    sys.exit(main())
