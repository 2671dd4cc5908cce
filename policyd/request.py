"""The Postfix policy delegation protocol: reading requests with limits, and the request itself.

A request is ``name=value`` lines ended by an empty line (https://www.postfix.org/SMTPD_POLICY_README.html).
The reader is incremental (bytes arrive in any split) and strict about what cannot be a request from
Postfix: a line without ``=``, a NUL byte, a name that is not ``[a-z0-9_]``, an over-long line or request,
or a request without ``request=smtpd_access_policy`` and ``protocol_state``. Any of those is a
ProtocolError: the server logs it and closes that one connection.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from dataclasses import dataclass, field
from itertools import repeat

from mailwarden.redis_guard import Guard
from policyd.results import TransactionState

_NAME = re.compile(rb"^[a-z0-9_]{1,64}$")
_NAME_TEXT = re.compile(r"[a-z0-9_]{1,64}")
_PAIR = re.compile(r"([a-z0-9_]+)=([^\n]*)")
POSTFIX_NAMES = frozenset({
    "request", "protocol_state", "protocol_name", "helo_name", "queue_id", "sender", "recipient",
    "recipient_count", "client_address", "client_name", "client_port", "reverse_client_name", "instance",
    "sasl_method", "sasl_username", "sasl_sender", "size", "ccert_subject", "ccert_issuer", "ccert_fingerprint",
    "ccert_pubkey_fingerprint", "encryption_protocol", "encryption_cipher", "encryption_keysize",
    "etrn_domain", "stress", "server_address", "server_port", "policy_context", "compatibility_level",
    "mail_version",
})
"""The attribute names a Postfix 3 smtpd sends (SMTPD_POLICY_README): all well-formed, so a request that uses
only these needs no per-name check (one set comparison); any other name is checked against the pattern."""


@functools.cache
def _well_formed(max_line: int) -> re.Pattern[bytes]:
    """name=value lines, none longer than max_line, no NUL: checked in one C-level pass per request."""
    line = rb"[a-z0-9_]{1,64}=[^\n\0]{0,%d}" % max_line
    return re.compile(line + rb"(?:\n" + line + rb")*")


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client address, or None; dotted quads go through inet_pton (C, strict) on the hot path."""
    if not text:
        return None
    try:
        return ipaddress.IPv4Address(int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big"))
    except OSError:
        pass
    try:
        # a zone index (fe80::1%eth0) means nothing beyond this host and breaks DNSBL queries: drop it
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


_NOT_SEPARATORS = bytes(byte for byte in range(256) if byte not in b"=\n")
_ALTERNATION = b"=\n" * 8192 + b"="
"""What a request's separators read, kept in order, when each line has exactly one ``=``: ``=\n=\n...=``."""


def _split_short(block: bytes) -> dict[str, str] | None:
    """The attributes of a request no longer than the line limit, or None when it is not NUL-free name=value
    lines: exactly what ``_well_formed`` accepts and ``_PAIR`` captures when no line can be too long, at a
    fraction of the cost (hot path; no regex pass over the request). Checking the decoded text rejects what
    the byte pattern rejects: NUL, ``\\n`` and ``=`` decode to themselves, and any other byte outside ASCII
    to a character outside ``[a-z0-9_]``.

    Most requests have one ``=`` per line (a value with ``=`` in it, an SRS sender say, is the exception):
    then its separators, kept in order by one C-level ``translate``, alternate ``=\\n=\\n...=``, and one
    split on both separators gives names and values in turn, with a third of the objects that splitting each
    line makes (each line's list and its strings, allocated and freed per request; half the parse's cost)."""
    if block.find(b"\0") >= 0:  # not `in`: bytes.__contains__ first tries the byte as an int and raises inside
        return None
    text = block.decode("utf-8", "replace")
    separators = block.translate(None, _NOT_SEPARATORS)
    if len(separators) & 1 and separators == _ALTERNATION[:len(separators)]:
        tokens = iter(text.replace("=", "\n").split("\n"))
        attrs = dict(zip(tokens, tokens, strict=True))  # name, value, name, value...
    else:
        lines = text.split("\n")
        count = len(lines)
        try:
            # name=value splits into [name, value] (on the first "="), a line without "=" into [line]: dict()
            # refuses it
            attrs = dict(map(str.split, lines, repeat("=", count), repeat(1, count)))
        except ValueError:
            return None
    if attrs.keys() <= POSTFIX_NAMES or all(_NAME_TEXT.fullmatch(name) for name in attrs):
        return attrs
    return None


class ProtocolError(Exception):
    """The peer does not speak the policy protocol (or exceeded a limit); the message says how."""


@dataclass(slots=True)
class PolicyRequest:
    """The attributes the checks use, normalised once; ``attrs`` keeps everything Postfix sent."""

    attrs: dict[str, str]
    protocol_state: str
    client_address: str
    client_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    client_ip_text: str
    """``str(client_ip)`` (the compressed form; "" without an address), made once: the block list and the
    greylist both key on it, and str() of an address costs about a microsecond."""
    client_name: str
    helo_name: str
    sender: str
    recipient: str
    sasl_username: str
    queue_id: str
    instance: str
    recipient_count: int
    transaction: TransactionState = field(default_factory=TransactionState)
    """Scratch space shared by the requests of one mail transaction on one connection (given by the
    connection from ``instance``): lets a check count a message once, not once per recipient."""
    skip: set[str] = field(default_factory=set)
    """Checks not to run for this request (set by access rules)."""
    waiting_on: str = "redis"
    """The dependency of the check running now: its fail mode answers when the time bound passes."""
    mailboxes: tuple[str, ...] = ()
    """The mailbox(es) the recipient delivers to, once recipient verification resolved it (for quota)."""
    rcpt_number: int = 1
    """1 for the first RCPT request of the transaction, 2 for the second... (set by the connection)."""
    guard: Guard | None = None
    """Reads an earlier check deferred (policyd/check.py): the next check's script carries them."""

    def take_guard(self) -> Guard | None:
        """The guard for the script about to run (a check that carries reads passes it to run_script); the
        pipeline sees it taken and knows the reads were made."""
        guard, self.guard = self.guard, None
        return guard

    @classmethod
    def from_attrs(cls, attrs: dict[str, str], transaction: TransactionState | None = None) -> PolicyRequest:
        # Hot path (once per request): positional arguments and a bound .get cost half as much as keywords;
        # tests/test_request_reader.py checks that every field gets the attribute of its name.
        get = attrs.get
        address = get("client_address", "")
        ip = parse_ip(address)
        if ip is None:
            ip_text = ""
        elif type(ip) is ipaddress.IPv4Address and ":" not in address and "%" not in address:
            ip_text = address  # parse_ip took it through inet_pton: already the canonical text, no str() needed
        else:
            if ip.version == 6 and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped  # ::ffff:192.0.2.1 is the IPv4 client 192.0.2.1
            ip_text = str(ip)
        try:
            count = int(get("recipient_count") or 0)
        except ValueError:
            count = 0
        return cls(
            attrs, get("protocol_state", "").upper(), address, ip, ip_text, get("client_name", ""),
            get("helo_name", ""), get("sender", ""), get("recipient", ""), get("sasl_username", ""),
            get("queue_id", ""), get("instance", ""), count, TransactionState() if transaction is None else transaction,
        )

    @property
    def authenticated(self) -> bool:
        return bool(self.sasl_username)


class RequestReader:
    """Turns a byte stream into attribute dicts, enforcing the configured limits."""

    __slots__ = ("_buf", "_well_formed", "max_line", "max_request")

    def __init__(self, max_line: int = 8192, max_request: int = 65536) -> None:
        self._buf = b""
        self.max_line = max_line
        self.max_request = max_request
        self._well_formed = _well_formed(max_line)

    @property
    def partial(self) -> bool:
        """True while part of a request has been received (used for the stalled-client timeout)."""
        return bool(self._buf)

    def feed(self, data: bytes) -> list[dict[str, str]]:
        buf = self._buf + data if self._buf else data
        requests = []
        while True:
            if buf.startswith(b"\n"):
                raise ProtocolError("empty request (a blank line with no attributes)")
            end = buf.find(b"\n\n")
            if end < 0:
                break
            requests.append(self._parse(buf[:end]))
            buf = buf[end + 2 :]
        if len(buf) > self.max_request:
            raise ProtocolError(f"request longer than {self.max_request} bytes")
        last_newline = buf.rfind(b"\n")
        if len(buf) - last_newline - 1 > self.max_line:
            raise ProtocolError(f"line longer than {self.max_line} bytes")
        self._buf = buf
        return requests

    def _parse(self, block: bytes) -> dict[str, str]:
        if len(block) > self.max_request:
            raise ProtocolError(f"request longer than {self.max_request} bytes")
        if len(block) <= self.max_line:  # every request from Postfix (under a kilobyte): no line can be too long
            attrs = _split_short(block)
            if attrs is None:
                raise ProtocolError(self._why_malformed(block))
        elif self._well_formed.fullmatch(block) is None:  # one C-level pass, with the line limit
            raise ProtocolError(self._why_malformed(block))
        else:
            attrs = dict(_PAIR.findall(block.decode("utf-8", "replace")))
        if block.find(b"\r") >= 0:  # find, as in _split_short
            attrs = {name: value.rstrip("\r") for name, value in attrs.items()}
        if attrs.get("request") != "smtpd_access_policy":
            raise ProtocolError(f"request={attrs.get('request', '(missing)')!r}, expected smtpd_access_policy")
        if not attrs.get("protocol_state"):
            raise ProtocolError("protocol_state missing")
        return attrs

    def _why_malformed(self, block: bytes) -> str:
        if b"\0" in block:
            return "NUL byte in request (binary data, not the policy protocol)"
        for line in block.split(b"\n"):
            if len(line) > self.max_line:
                return f"line longer than {self.max_line} bytes"
            name, eq, _value = line.partition(b"=")
            if not eq or not _NAME.match(name):
                return f"not a name=value line: {line[:40].decode('ascii', 'backslashreplace')!r}"
        return "malformed request"
