"""TTL-aware DNS polling of cluster endpoints with dnspython: follows CNAMEs, keeps the last good answer."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver

log = logging.getLogger("multiproxy.dns")
MAX_CNAME_HOPS = 8


@dataclass
class DnsAnswer:
    """Addresses a name resolved to, through which CNAMEs, and for how long the answer may be kept."""

    addresses: tuple[str, ...]
    chain: tuple[str, ...]
    ttl: float
    resolved_at: float = field(default_factory=time.monotonic)


class DnsLookupFailed(Exception):
    """No usable answer (timeout, NXDOMAIN, SERVFAIL, no address records)."""


class DnsClient:
    """Asks one configured nameserver (or the system's) for A/AAAA records, following CNAME chains."""

    def __init__(self, nameserver: str = "", port: int = 53, timeout: float = 2.0):
        self.nameserver = nameserver
        self.port = port
        self.timeout = timeout
        if not nameserver:
            self._resolver = dns.resolver.Resolver()
            self._resolver.lifetime = timeout

    def resolve(self, name: str) -> DnsAnswer:
        if not self.nameserver:
            return self._resolve_system(name)
        qname = dns.name.from_text(name)
        chain = [name.rstrip(".")]
        ttl = None
        for _ in range(MAX_CNAME_HOPS):
            query = dns.message.make_query(qname, dns.rdatatype.A)
            try:
                response = dns.query.udp(query, self.nameserver, timeout=self.timeout, port=self.port)
            except (dns.exception.Timeout, OSError) as exc:
                raise DnsLookupFailed(f"{name}: no answer from {self.nameserver}:{self.port} ({exc or 'timeout'})") from None
            rcode = response.rcode()
            if rcode != dns.rcode.NOERROR:
                raise DnsLookupFailed(f"{name}: {dns.rcode.to_text(rcode)} from {self.nameserver}:{self.port}")
            addresses = []
            next_name = None
            for rrset in response.answer:
                ttl = rrset.ttl if ttl is None else min(ttl, rrset.ttl)
                if rrset.rdtype == dns.rdatatype.A and rrset.name == qname:
                    addresses.extend(r.address for r in rrset)
                elif rrset.rdtype == dns.rdatatype.CNAME and rrset.name == qname:
                    next_name = rrset[0].target
            # A server may put the CNAME's target records in the same answer.
            if not addresses and next_name is not None:
                for rrset in response.answer:
                    if rrset.rdtype == dns.rdatatype.A and rrset.name == next_name:
                        addresses.extend(r.address for r in rrset)
                if addresses:
                    chain.append(next_name.to_text().rstrip("."))
            if addresses:
                return DnsAnswer(tuple(sorted(addresses)), tuple(chain), float(ttl or 0))
            if next_name is None:
                raise DnsLookupFailed(f"{name}: no address records")
            chain.append(next_name.to_text().rstrip("."))
            qname = next_name
        raise DnsLookupFailed(f"{name}: CNAME chain longer than {MAX_CNAME_HOPS}")

    def _resolve_system(self, name: str) -> DnsAnswer:
        try:
            answer = self._resolver.resolve(name, "A")
        except dns.exception.DNSException as exc:
            raise DnsLookupFailed(f"{name}: {exc}") from None
        chain = [name.rstrip(".")]
        if answer.canonical_name.to_text().rstrip(".") != chain[0]:
            chain.append(answer.canonical_name.to_text().rstrip("."))
        return DnsAnswer(tuple(sorted(r.address for r in answer)), tuple(chain), float(answer.rrset.ttl))


class EndpointWatch:
    """One endpoint name polled on its TTL, clamped to [floor, ceiling]; the last good answer survives failures."""

    def __init__(self, name: str, client: DnsClient, ttl_floor: float, ttl_ceiling: float):
        self.name = name
        self.client = client
        self.ttl_floor = ttl_floor
        self.ttl_ceiling = ttl_ceiling
        self.answer: DnsAnswer | None = None
        self.next_poll = 0.0
        self.failures = 0
        self.lookups = 0
        self.last_error = ""
        self.changes = 0

    def due(self, now: float) -> bool:
        return now >= self.next_poll

    def poll(self, now: float | None = None) -> bool:
        """Resolve now; True when the addresses changed. On failure keep the last answer and retry at the floor."""
        now = time.monotonic() if now is None else now
        self.lookups += 1
        try:
            answer = self.client.resolve(self.name)
        except DnsLookupFailed as exc:
            self.failures += 1
            self.last_error = str(exc)
            self.next_poll = now + self.ttl_floor
            kept = ", ".join(self.answer.addresses) if self.answer else "nothing"
            log.warning("dns: %s; keeping the last good answer (%s)", exc, kept)
            return False
        self.last_error = ""
        self.next_poll = now + min(max(answer.ttl, self.ttl_floor), self.ttl_ceiling)
        changed = self.answer is None or self.answer.addresses != answer.addresses
        if changed and self.answer is not None:
            self.changes += 1
            log.info("dns: %s now resolves to %s (was %s; via %s)", self.name, ", ".join(answer.addresses),
                     ", ".join(self.answer.addresses), " -> ".join(answer.chain))
        self.answer = answer
        return changed

    @property
    def addresses(self) -> tuple[str, ...]:
        return self.answer.addresses if self.answer else ()
