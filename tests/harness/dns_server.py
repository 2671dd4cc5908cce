"""A tiny authoritative DNS server for tests: UDP and TCP on one loopback port, inside the test process.

Why our own server: DNSBL and SPF code must be tested against real DNS packets (dnspython, pyspf, aiodns/
c-ares in pydnsbl all speak the wire protocol), but the machine's resolver must never be used and no
Debian DNS server is needed. ``dnslib`` parses the zone text and the packets; socketserver threads serve
them. ``python -m dnslib.zoneresolver`` was not enough: it serves UDP *or* TCP per process and answers
NXDOMAIN where NODATA is right, which changes what an SPF or DNSBL client does.

Test controls:

* ``silent_names``: never answer (UDP datagrams dropped, TCP connections held open without a reply), to
  test timeouts.
* ``garbage_names``: answer with bytes that do not parse, to test bad answers. Over UDP the server first
  answers "truncated" (TC bit), so every client retries over TCP and gets the garbage there: dnspython's
  resolver silently drops unparseable UDP datagrams (spoofing protection) and would only time out, which a
  test could not tell apart from ``silent_names``. With TC then garbage, dnspython raises
  ``NoNameservers`` and aiodns ``DNSError`` (ARES_EBADRESP), both at once.
* ``set_zone(text)``: replace the zone while running (e.g. a client gets listed mid-test).

A name in either set matches itself and every name below it (``{"bl.test"}`` silences the whole list).
Names are compared without case and trailing dot; the sets may be changed while the server runs.
"""

from __future__ import annotations

import ipaddress
import socket
import socketserver
import struct
import threading
from dataclasses import dataclass, field
from types import TracebackType

from dnslib import QTYPE, RCODE, RR, DNSError, DNSRecord

# RFC 5782 test entries (127.0.0.2 / ::ffff:127.0.0.2 listed, 127.0.0.1 never) in every list; the
# listed test clients use documentation addresses (RFC 5737 / RFC 3849) only.
# TTL 0 and SOA minimum 0: c-ares (aiodns, pydnsbl) caches answers and NXDOMAINs for their TTL by default
# (pycares 4.11 offers no way to turn that off), so with TTL 60 a long-lived client would not see
# set_zone() or garbage_names for a minute, and answers would leak from one test into the next.
TEST_ZONE = r"""
$ORIGIN test.
$TTL 0
test.                   IN SOA ns.test. hostmaster.test. 1 3600 600 86400 0

; --- DNSBL bl.test: test entry 127.0.0.2, client 192.0.2.99, IPv6 client 2001:db8::99
2.0.0.127.bl.test.      IN A   127.0.0.2
2.0.0.127.bl.test.      IN TXT "Listed: RFC5782 test entry"
99.2.0.192.bl.test.     IN A   127.0.0.2
99.2.0.192.bl.test.     IN TXT "Listed: 192.0.2.99 seen spamming, see http://bl.test/q?192.0.2.99"
2.0.0.0.0.0.f.7.f.f.f.f.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.bl.test. IN A 127.0.0.2
2.0.0.0.0.0.f.7.f.f.f.f.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.bl.test. IN TXT "Listed: RFC5782 IPv6 test entry"
9.9.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.test. IN A 127.0.0.2
9.9.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.test. IN TXT "Listed: 2001:db8::99 seen spamming"

; --- second DNSBL weak.test: client 192.0.2.98 with return code 127.0.0.5
2.0.0.127.weak.test.    IN A   127.0.0.2
98.2.0.192.weak.test.   IN A   127.0.0.5

; --- DNSWL wl.test: client 192.0.2.77 with return code 127.0.10.1
2.0.0.127.wl.test.      IN A   127.0.0.2
77.2.0.192.wl.test.     IN A   127.0.10.1

; --- SPF: example.test allows 192.0.2.0/25 plus include:_spf.example.test (198.51.100.10 and .11)
example.test.           IN TXT "v=spf1 ip4:192.0.2.0/25 include:_spf.example.test -all"
example.test.           IN MX  10 mx.example.test.
_spf.example.test.      IN TXT "v=spf1 ip4:198.51.100.10 ip4:198.51.100.11 -all"
softfail.test.          IN TXT "v=spf1 ip4:192.0.2.1 ~all"
fail.test.              IN TXT "v=spf1 -all"
; HELO name: SPF for the HELO identity
mx.example.test.        IN A   192.0.2.10
mx.example.test.        IN TXT "v=spf1 a -all"
"""


def dnsbl_query_name(address: str, zone: str) -> str:
    """The name a DNSBL client looks up for ``address`` in ``zone`` (reversed octets, or IPv6 nibbles)."""
    pointer = ipaddress.ip_address(address).reverse_pointer
    return pointer.rsplit(".", 2)[0] + "." + zone.rstrip(".")


def _norm(name: object) -> str:
    return str(name).rstrip(".").lower()


def _matches(qname: str, names: set[str] | frozenset[str]) -> bool:
    # tuple() copies in one step under the GIL: the test thread may add names while a query is answered
    return any(qname == n or qname.endswith("." + n) for n in map(_norm, tuple(names)))


@dataclass(frozen=True)
class _Zone:
    """Parsed zone, replaced as a whole by set_zone so a query never sees half of an old and new zone."""

    records: dict[str, list[RR]]
    soas: dict[str, RR]

    @classmethod
    def parse(cls, text: str) -> _Zone:
        records: dict[str, list[RR]] = {}
        soas: dict[str, RR] = {}
        for rr in RR.fromZone(text):
            name = _norm(rr.rname)
            records.setdefault(name, []).append(rr)
            if rr.rtype == QTYPE.SOA:
                soas[name] = rr
        return cls(records, soas)

    def exists(self, name: str) -> bool:
        """A name exists if it owns records or a name below it does (empty non-terminal, RFC 8020)."""
        return name in self.records or any(owner.endswith("." + name) for owner in self.records)

    def soa_for(self, name: str) -> RR | None:
        labels = name.split(".")
        for i in range(len(labels)):
            if (soa := self.soas.get(".".join(labels[i:]))) is not None:
                return soa
        return None


def garbage_reply(query: bytes) -> bytes:
    """Starts like the answer to ``query`` (same ID, QR set, counts that promise answers) so clients take it
    as the reply, then a compression pointer pointing forward and junk: no parser accepts it."""
    return query[:2] + b"\x85\x80\x00\x01\x00\x05\x00\x00\x00\x00" + b"\xc0\xff\x3f\x3fGARBAGE-NOT-DNS" * 2


@dataclass(frozen=True)
class Query:
    name: str
    qtype: str
    protocol: str


@dataclass
class DnsServer:
    zone_text: str = TEST_ZONE
    host: str = "127.0.0.1"
    silent_names: set[str] = field(default_factory=set)
    garbage_names: set[str] = field(default_factory=set)
    queries: list[Query] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._zone = _Zone.parse(self.zone_text)
        self._stopping = threading.Event()
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []

    # --- control -----------------------------------------------------------------------------------------

    def start(self) -> DnsServer:
        """Bind TCP to a kernel-chosen port, then UDP to the same number (retrying if that UDP port is taken),
        so both are race-free without a separate free_port() probe."""
        handler = _make_handler(self)
        for _attempt in range(20):
            tcp = _TCPServer((self.host, self.port), handler)
            try:
                udp = _UDPServer((self.host, tcp.server_address[1]), handler)
            except OSError:
                tcp.server_close()
                if self.port:
                    raise
                continue
            break
        else:
            raise RuntimeError("no port free for both UDP and TCP")
        self.port = tcp.server_address[1]
        self._stopping.clear()
        self._servers = [udp, tcp]
        self._threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.02},
                                          name=f"dns-{type(s).__name__}-{self.port}", daemon=True)
                         for s in self._servers]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases TCP handlers held open for silent names
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(5)
        self._servers, self._threads = [], []

    def set_zone(self, text: str) -> None:
        """Serve ``text`` from the next query on (parse errors raise here, the old zone stays)."""
        self._zone = _Zone.parse(text)
        self.zone_text = text

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # --- answering ---------------------------------------------------------------------------------------

    def answer(self, data: bytes, protocol: str) -> bytes | None:
        """The bytes to send back for one query, or None to stay silent."""
        try:
            request = DNSRecord.parse(data)
        except DNSError:
            return None
        qname = _norm(request.q.qname)
        self.queries.append(Query(qname, QTYPE.get(request.q.qtype, str(request.q.qtype)), protocol))
        if _matches(qname, self.silent_names):
            return None
        if _matches(qname, self.garbage_names):
            if protocol == "udp":
                reply = request.reply()
                reply.header.tc = 1
                return reply.pack()
            return garbage_reply(data)
        return self.resolve(request).pack()

    def resolve(self, request: DNSRecord) -> DNSRecord:
        zone, q = self._zone, request.q
        qname = _norm(q.qname)
        reply = request.reply()  # aa=1, ra=1, same id and question
        for rr in zone.records.get(qname, []):
            if q.qtype in (rr.rtype, QTYPE.ANY):
                reply.add_answer(rr)
        if not reply.rr:
            # NXDOMAIN only when the name does not exist at all; an existing name without this type is
            # NODATA (NOERROR, empty answer): SPF and DNSBL clients treat the two differently
            if not zone.exists(qname):
                reply.header.rcode = RCODE.NXDOMAIN
            if (soa := zone.soa_for(qname)) is not None:
                reply.add_auth(soa)  # lets resolvers cache the negative answer, as real servers do
        return reply


class _UDPServer(socketserver.ThreadingMixIn, socketserver.UDPServer):
    daemon_threads = True


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True  # a restart on the same port must not wait for TIME_WAIT connections


def _make_handler(dns: DnsServer) -> type[socketserver.BaseRequestHandler]:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            if isinstance(self.request, tuple):
                data, sock = self.request
                reply = dns.answer(data, "udp")
                if reply is not None:
                    sock.sendto(reply, self.client_address)
                return
            conn: socket.socket = self.request
            conn.settimeout(10)
            while not dns._stopping.is_set():  # several queries may share one TCP connection
                data = _recv_tcp_message(conn)
                if data is None:
                    return
                reply = dns.answer(data, "tcp")
                if reply is None:
                    dns._stopping.wait()  # hold the connection open, unanswered, until the server stops
                    return
                conn.sendall(struct.pack("!H", len(reply)) + reply)

    return Handler


def _recv_tcp_message(conn: socket.socket) -> bytes | None:
    try:
        header = _recv_exactly(conn, 2)
        return _recv_exactly(conn, struct.unpack("!H", header)[0]) if header else None
    except OSError:
        return None


def _recv_exactly(conn: socket.socket, size: int) -> bytes | None:
    buf = b""
    while len(buf) < size:
        chunk = conn.recv(size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf
