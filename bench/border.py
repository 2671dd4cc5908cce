"""The environment and the request mix of the ``mailwarden-border`` benchmark (see policyd_bench.py).

policyd runs every border check here: access, blocklist, ratelimit, dnsbl, spf, recipients, quota, greylist.
Their dependencies are the real components of the test harness (tests/harness/): the DNS server with the
test zones (in a child process of its own, see ``serve_dns``), a private slapd and a private Dovecot with
its quota-status service. This module builds what they serve (zone, directory, mailboxes) and the
requests, each with the answer its category must get.

Run as a script it is that DNS child:  python bench/border.py serve-dns ZONE_FILE
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import random
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))  # the harness: tests/harness/*

from harness.dns_server import TEST_ZONE, DnsServer, _Zone  # noqa: E402
from harness.dovecot import DEFAULT_USERS, DOVECOT, DovecotInstance, MailUser  # noqa: E402
from harness.slapd import FIXTURES, SLAPD, SlapdInstance  # noqa: E402

DOMAIN = "example.org"
LISTS = [
    {"zone": "bl.test", "weight": 2},
    {"zone": "weak.test", "weight": 1},
    {"zone": "wl.test", "weight": -5},
]
THRESHOLD = 2
LISTED_TTL = 300
"""TTL of the DNSBL entries added for the benchmark. The harness's own entries have TTL 0 (so tests can
change the zone at will), and policyd caches no answer with TTL 0 in Redis: listed clients would never be
warm. Unlisted clients get NXDOMAIN, which policyd caches for ``negative_ttl`` (5 min) whatever the SOA."""

# example.test's SPF policy includes _spf.example.test; the benchmark's clients come from 10.0.0.0/8, so that
# include also names that network: example.test senders pass SPF through the include (two TXT lookups).
_SPF_POOL = '"v=spf1 ip4:198.51.100.10 ip4:198.51.100.11 -all"'
_SPF_POOL_BENCH = '"v=spf1 ip4:198.51.100.10 ip4:198.51.100.11 ip4:10.0.0.0/8 -all"'

# -- the request mix -----------------------------------------------------------------------------------

CLIENT_MIX = {  # which lists list the client (weights: bl.test 2, weak.test 1, wl.test -5; threshold 2)
    "unlisted": 88,
    "bl.test": 5,          # score 2: rejected
    "weak.test": 3,        # score 1: below the threshold, goes on
    "wl.test": 3,          # score -5: an allow-listed client, goes on
    "bl.test+wl.test": 1,  # score -3: the allow list outweighs the block list, goes on
}
SENDER_MIX = {
    "spf-pass": 50,        # s-xxx@example.test from 10.0.0.0/8 (through include:_spf.example.test)
    "spf-softfail": 10,    # s-xxx@softfail.test (~all): a Received-SPF header only
    "spf-none": 37,        # s-xxx@xxx.nospf.example: a domain that does not exist (NXDOMAIN), unique
    "spf-fail": 3,         # s-xxx@fail.test (-all): rejected
}
RECIPIENT_MIX = {
    "directory-user": 70,  # u-xxx@example.org (or its alternate address), each once per stream
    "test-user": 13,       # alice, carol, c.smith (carol's alternate address), team: the same four again and again
    "unknown": 10,         # nobody-xxx@example.org, unique: 550 5.1.1
    "over-quota": 5,       # full@example.org: in the directory, over quota in Dovecot: 452 4.2.2
    "disabled": 2,         # bob@example.org (accountStatus disabled): 550 5.2.1
}
TEST_USERS = ("alice@example.org", "carol@example.org", "c.smith@example.org", "team@example.org")
ALTERNATE_SHARE = 0.1
"""Share of directory users addressed by their mailAlternateAddress (resolved to the mailbox)."""

# What each outcome's answer starts with (after "action="), in the order policyd's checks decide.
EXPECTED = {
    "dnsbl-reject": b"action=550 5.7.1 Service unavailable; client [",
    "spf-reject": b"action=550 5.7.23 SPF: fail.test does not allow ",
    "unknown-rcpt": b"action=550 5.1.1 User unknown\n",
    "disabled-rcpt": b"action=550 5.2.1 Mailbox disabled\n",
    "over-quota": b"action=452 4.2.2 Mailbox is full\n",
    "greylisted": b"action=DEFER_IF_PERMIT Greylisted, please try again in ",
    # an allow-listed client skips greylisting (skip_dnswl): accepted, with the Received-SPF header
    "allow-listed": b"action=PREPEND Received-SPF: ",
    "allow-listed-no-spf": b"action=DUNNO\n",
}
OUTCOMES = tuple(EXPECTED)


def checks(without: Sequence[str] = ()) -> list[str]:
    """policyd's checks, leaving out those in ``without`` (--border-without: what does each one cost?)."""
    return [check for check in ("access", "blocklist", "ratelimit", "dnsbl", "spf", "recipients", "quota",
                                "greylist") if check not in without]


def outcome_of(client_kind: str, sender_kind: str, recipient_kind: str, without: Sequence[str] = ()) -> str:
    """The answer a request must get, by the check order access, blocklist, ratelimit, dnsbl, spf,
    recipients, quota, greylist (the first decisive one wins; nothing here is blocked or rate-limited),
    leaving out the checks in ``without``. (Without recipients, the quota check asks for the recipient
    itself: full@ is still full, the others are no Dovecot users or have room.)"""
    score = sum(lst["weight"] for lst in LISTS if lst["zone"] in client_kind.split("+"))
    if score >= THRESHOLD and "dnsbl" not in without:
        return "dnsbl-reject"
    if sender_kind == "spf-fail" and "spf" not in without:
        return "spf-reject"
    if recipient_kind == "unknown" and "recipients" not in without:
        return "unknown-rcpt"
    if recipient_kind == "disabled" and "recipients" not in without:
        return "disabled-rcpt"
    if recipient_kind == "over-quota" and "quota" not in without:
        return "over-quota"
    if "wl.test" in client_kind.split("+") and "dnsbl" not in without:
        return "allow-listed" if "spf" not in without else "allow-listed-no-spf"
    return "greylisted"


@dataclass(frozen=True, slots=True)
class BorderRequest:
    client: str
    sender: str
    recipient: str
    client_kind: str
    outcome: str

    @property
    def lists(self) -> list[str]:
        return [] if self.client_kind == "unlisted" else self.client_kind.split("+")


def letters(number: int) -> str:
    """``number`` in base 26 as letters (policyd turns digits in a sender into '#')."""
    out = []
    while True:
        number, digit = divmod(number, 26)
        out.append(chr(97 + digit))
        if number == 0:
            return "".join(reversed(out))


def _kinds(mix: dict[str, int], count: int, rng: random.Random) -> list[str]:
    """Exactly the mix's shares of ``count`` (largest remainders), in random order."""
    total = sum(mix.values())
    exact = {kind: count * weight / total for kind, weight in mix.items()}
    counts = {kind: int(value) for kind, value in exact.items()}
    for kind in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[:count - sum(counts.values())]:
        counts[kind] += 1
    kinds = [kind for kind, n in counts.items() for _ in range(n)]
    rng.shuffle(kinds)
    return kinds


def directory_size(requests: int) -> int:
    """Generated directory users: enough that no stream addresses one of them twice."""
    share = RECIPIENT_MIX["directory-user"] / sum(RECIPIENT_MIX.values())
    return int(requests * share) + 16


def make_stream(index: int, numbers: Sequence[int], users: int, client_address: Callable[[int], str],
                without: Sequence[str] = ()) -> list[BorderRequest]:
    """One stream of ``len(numbers)`` requests. ``numbers`` are never used twice in the benchmark, so every
    client address (10.0.0.0/8), unknown recipient and sender domain is new to policyd. Directory users
    are drawn without repetition within the stream (every stream reuses the same directory)."""
    count = len(numbers)
    rng = random.Random(f"mailwarden-border-{index}")
    clients = _kinds(CLIENT_MIX, count, rng)
    senders = _kinds(SENDER_MIX, count, rng)
    recipients = _kinds(RECIPIENT_MIX, count, rng)
    directory = rng.sample(range(users), sum(1 for kind in recipients if kind == "directory-user"))
    stream = []
    for number, client_kind, sender_kind, recipient_kind in zip(numbers, clients, senders, recipients, strict=True):
        name = letters(number)
        sender = {
            "spf-pass": f"s-{name}@example.test",
            "spf-softfail": f"s-{name}@softfail.test",
            "spf-none": f"s-{name}@{name}.nospf.example",
            "spf-fail": f"s-{name}@fail.test",
        }[sender_kind]
        if recipient_kind == "directory-user":
            user = letters(directory.pop())
            recipient = f"a-{user}@{DOMAIN}" if rng.random() < ALTERNATE_SHARE else f"u-{user}@{DOMAIN}"
        elif recipient_kind == "test-user":
            recipient = rng.choice(TEST_USERS)
        elif recipient_kind == "unknown":
            recipient = f"nobody-{name}@{DOMAIN}"
        elif recipient_kind == "over-quota":
            recipient = f"full@{DOMAIN}"
        else:
            recipient = f"bob@{DOMAIN}"
        stream.append(BorderRequest(client_address(number), sender, recipient, client_kind,
                                    outcome_of(client_kind, sender_kind, recipient_kind, without)))
    return stream


# -- what the components serve ------------------------------------------------------------------------


def zone_text(streams: Sequence[Sequence[BorderRequest]]) -> str:
    """The harness's TEST_ZONE (the SPF include widened to 10.0.0.0/8) plus an entry in each list that lists
    a client of the streams, with an explicit TTL of LISTED_TTL."""
    if _SPF_POOL not in TEST_ZONE:
        raise RuntimeError("tests/harness/dns_server.py TEST_ZONE changed: update bench/border.py _SPF_POOL")
    lines = [TEST_ZONE.replace(_SPF_POOL, _SPF_POOL_BENCH), "; --- added by bench/border.py"]
    codes = {"bl.test": "127.0.0.2", "weak.test": "127.0.0.5", "wl.test": "127.0.10.1"}
    for stream in streams:
        for request in stream:
            for zone in request.lists:
                name = ipaddress.ip_address(request.client).reverse_pointer.removesuffix(".in-addr.arpa")
                lines.append(f"{name}.{zone}. {LISTED_TTL} IN A {codes[zone]}")
    return "\n".join(lines) + "\n"


def ldif_text(users: int) -> str:
    """The harness's test directory (alice, bob disabled, carol with alternate addresses, team), plus
    full@example.org (Dovecot's over-quota user, absent from the test directory) and ``users`` generated
    mailboxes u-xxx@example.org, each with an alternate address a-xxx@example.org."""
    parts = [(FIXTURES / "data.ldif").read_text().rstrip("\n"), ""]
    entries = [("full", "Full Mailbox", f"full@{DOMAIN}", None)]
    entries += [(f"u-{letters(i)}", f"User {letters(i)}", f"u-{letters(i)}@{DOMAIN}", f"a-{letters(i)}@{DOMAIN}")
                for i in range(users)]
    for uid, cn, mail, alternate in entries:
        parts += [f"dn: uid={uid},ou=people,dc=example,dc=org", "objectClass: inetOrgPerson",
                  "objectClass: qmailUser", f"uid: {uid}", f"cn: {cn}", f"sn: {uid}", f"mail: {mail}"]
        if alternate:
            parts.append(f"mailAlternateAddress: {alternate}")
        parts += ["accountStatus: active", ""]
    return "\n".join(parts) + "\n"


def mail_users(users: int) -> tuple[MailUser, ...]:
    """Dovecot's users: the harness's (alice, carol, full over quota, three) and every generated mailbox,
    so quota-status finds each mailbox the directory resolves an address to (team@ is not a mailbox:
    quota-status answers "no such user", which is no verdict)."""
    return DEFAULT_USERS + tuple(MailUser(f"u-{letters(i)}@{DOMAIN}", "pw") for i in range(users))


# -- the components, started so they die with the benchmark -------------------------------------------


@dataclass
class BenchSlapd(SlapdInstance):
    """The harness's slapd, started as user openldap directly (not as root with -u, which would clear
    PR_SET_PDEATHSIG) and in its own session, with ``preexec`` run before exec."""

    preexec: Callable[[], None] | None = None

    def start(self, timeout: float = 30.0) -> BenchSlapd:
        self.build()
        d = self.workdir
        with open(d / "slapd.log", "ab") as log:
            self.proc = subprocess.Popen([SLAPD, "-d", "none", "-F", str(d / "slapd.d"), "-h", f"{self.url}/"],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, user="openldap",
                                         group="openldap", extra_groups=[], start_new_session=True,
                                         preexec_fn=self.preexec)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self


@dataclass
class BenchDovecot(DovecotInstance):
    """The harness's Dovecot, its master given ``preexec`` (the master stays root; it stops its children)."""

    preexec: Callable[[], None] | None = None

    def start(self, timeout: float = 60.0) -> BenchDovecot:
        self.build()
        with open(self.workdir / "dovecot.stderr", "ab") as log:
            self.proc = subprocess.Popen([DOVECOT, "-F", "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, start_new_session=True, preexec_fn=self.preexec)
        try:
            self._wait_ready(timeout)
            if not self._filled:
                for user in self.users:
                    if user.fill:
                        self.fill(user.address, user.fill)
                self._filled = True
        except BaseException:
            self.stop()
            raise
        return self


# -- the DNS child ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _IndexedZone(_Zone):
    """The harness's zone with every existing name in a set: its ``exists`` scans all owners per NXDOMAIN,
    fine for a test zone, too slow for thousands of benchmark entries."""

    names: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def of(cls, zone: _Zone) -> _IndexedZone:
        names = set()
        for owner in zone.records:
            labels = owner.split(".")
            names.update(".".join(labels[i:]) for i in range(len(labels)))
        return cls(zone.records, zone.soas, frozenset(names))

    def exists(self, name: str) -> bool:
        return name in self.names


def _query_kind(name: str) -> str:
    for lst in LISTS:
        if name.endswith("." + lst["zone"]):
            return lst["zone"]
    return "spf"


def serve_dns(zone_file: str) -> int:
    """Answer DNS over UDP on a loopback port with the harness's DnsServer.answer() (its zone parsing and its
    NXDOMAIN/NODATA semantics), from one plain receive loop: the harness serves every datagram from a new
    thread, which costs about four times the answer itself (490 µs against 92 µs a query here). No answer is
    long enough to be truncated, so no client falls back to TCP. Prints "port N"; answers each "stats" line
    on stdin with the query counts so far as JSON; exits when stdin closes."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    dns = DnsServer(zone_text=Path(zone_file).read_text())
    dns._zone = _IndexedZone.of(dns._zone)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", 0))

    def answer_forever() -> None:
        while True:
            data, peer = sock.recvfrom(4096)
            reply = dns.answer(data, "udp")
            if reply is not None:
                sock.sendto(reply, peer)

    threading.Thread(target=answer_forever, name="dns-udp", daemon=True).start()
    counts: dict[str, int] = {"total": 0}
    seen = 0
    print(f"port {sock.getsockname()[1]}", flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            queries = dns.queries[seen:]
            seen += len(queries)
            for query in queries:
                kind = _query_kind(query.name)
                counts[kind] = counts.get(kind, 0) + 1
                counts["total"] += 1
            print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve-dns":
        sys.exit(serve_dns(sys.argv[2]))
    print(__doc__, file=sys.stderr)
    sys.exit(2)
