"""The ``[policyd]`` section: where the daemon listens, which checks run in which order, and how each
check and each dependency behaves. Every field says its unit and default; the annotated example config
(etc/mailwarden.toml) documents them for operators."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from mailwarden.section import Section
from mailwarden.units import Duration, parse_duration
from policyd.greylist import GreylistSettings
from policyd.rules_files import shipped_rules_file
from policyd.settings_types import CheckName, Network, SqlQuery, check_template, listen_entry

FailAction = Literal["dunno", "defer_if_permit", "defer"]
"""What to answer when a dependency fails: ``dunno`` lets the next check and Postfix decide (fail open),
``defer_if_permit`` and ``defer`` give the client a temporary failure (fail closed)."""


class FailModes(Section):
    """Fail mode of one dependency, chosen per class of client."""

    inbound: FailAction = "dunno"
    """Unauthenticated clients (mail from the Internet)."""
    authenticated: FailAction = "dunno"
    """SASL-authenticated submission."""


def _parse_window(value: object) -> float | str:
    if value == "message":
        return "message"
    try:
        return parse_duration(value)
    except ValueError:
        raise ValueError(f"{value!r} is neither a duration ('1h', '1d', 3600) nor \"message\"") from None


RateKey = Literal["sasl_user", "sender", "sender_domain", "client_address", "global"]


class RateLimit(Section):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    """Shown in the log, the metrics and the reply text; also part of the Redis key."""
    key: RateKey
    """What is counted against: the SASL user (the safe default for outbound), the envelope sender or its
    domain (forgeable: an outsider can exhaust a victim's limit), the client address (network prefix
    from client_prefix_v4/v6), or ``global``: one counter for all matching clients, a server-wide brake."""
    count: Literal["messages", "recipients"] = "messages"
    max: Annotated[int, Field(ge=1)]
    window: Annotated[float | Literal["message"], BeforeValidator(_parse_window)]
    """A sliding window in time ("1h", "1d"), or "message" for a cap on recipients of one message."""
    action: Literal["defer", "reject", "hold"] = "defer"
    """``hold``: Postfix accepts the message into its hold queue (nothing lost, nothing sent) for the
    postmaster to release (postsuper -H) or delete."""
    stage: Literal["rcpt", "end-of-message"] = "rcpt"
    """``rcpt``: counted at RCPT (a message once, at its first recipient). ``end-of-message``: checked at
    RCPT, counted at END-OF-MESSAGE with recipient_count, so only mail that was accepted counts (needs
    check_policy_service in smtpd_end_of_data_restrictions too)."""
    applies_to: Literal["authenticated", "unauthenticated", "all"] | None = None
    """Which clients the limit applies to; by default authenticated clients for key=sasl_user, all others."""

    @model_validator(mode="after")
    def _consistent(self) -> RateLimit:
        if self.window == "message" and self.count != "recipients":
            raise ValueError('window = "message" only makes sense with count = "recipients"')
        if self.window == "message" and self.stage != "rcpt":
            raise ValueError('window = "message" is enforced at RCPT; set stage = "rcpt"')
        if isinstance(self.window, float) and self.window < 1:
            raise ValueError("window must be at least 1s")
        return self

    @property
    def clients(self) -> str:
        return self.applies_to or ("authenticated" if self.key in ("sasl_user", "global") else "all")


def _default_limits() -> list[RateLimit]:
    return [
        RateLimit(name="user-messages-per-hour", key="sasl_user", count="messages", max=200, window=3600),
        RateLimit(name="user-recipients-per-day", key="sasl_user", count="recipients", max=1000, window=86400),
    ]


class RateOverride(Section):
    """A per-key exception: the newsletter account, a mailing-list server."""

    limit: str
    key: str
    """The key value as counted: a SASL user name, an address, a domain or a client network."""
    max: Annotated[int, Field(ge=1)] | None = None
    exempt: bool = False

    @model_validator(mode="after")
    def _one(self) -> RateOverride:
        if self.exempt == (self.max is not None):
            raise ValueError("give either max = N or exempt = true")
        return self


class NotifySettings(Section):
    """One message to the user and one to the admin at a key's first refusal in a window (never one per
    message), sent through an SMTP relay (normally the local Postfix)."""

    relay: str | None = None
    """HOST:PORT of the SMTP server to send through, e.g. "127.0.0.1:25"; unset: no notifications."""
    sender: str = "postmaster@localhost"
    admin: str | None = None
    """Address of the postmaster or security team; unset: only the user is told."""
    user_domain: str | None = None
    """Domain for SASL user names that are not addresses (alice -> alice@user_domain); unset: the
    envelope sender of the message that hit the limit is told."""
    user_subject: str = "Your outgoing mail has been held back"
    user_text: str = (
        "You have sent more mail in a short time than this server allows ({max} {count} per {window}).\n"
        "Further mail is being {done} for now. If you did not send this mail, your password may be known "
        "to someone else: change it and contact the help desk.\n"
    )
    admin_subject: str = "Rate limit {name} reached by {key}"
    admin_text: str = "{key} reached the rate limit {name} ({max} {count} per {window}); its mail is being {done}.\n"
    """Subjects and texts are templates; placeholders: {name} (the limit), {key} (who reached it), {max},
    {count} (messages or recipients), {window}, {done} (deferred, refused, held for review)."""

    _fields = {"name", "key", "max", "count", "window", "done"}

    @field_validator("user_subject", "admin_subject")
    @classmethod
    def _subjects(cls, text: str) -> str:
        return check_template(text, cls._fields.default)  # type: ignore[attr-defined]

    @field_validator("user_text", "admin_text")
    @classmethod
    def _texts(cls, text: str) -> str:
        return check_template(text, cls._fields.default, one_line=False)  # type: ignore[attr-defined]

    @field_validator("relay")
    @classmethod
    def _relay(cls, relay: str | None) -> str | None:
        return relay if relay is None else listen_entry(relay)


class RateLimitSettings(Section):
    limits: list[RateLimit] = Field(default_factory=_default_limits)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    overrides: list[RateOverride] = []
    ldap_attribute: str | None = None
    """An attribute of the user's directory entry (found with ldap_filter through [policyd.recipients.ldap])
    holding overrides for limits keyed by sasl_user: "exempt", a number (every such limit), or
    "LIMIT=N" / "LIMIT=exempt" (one limit); multi-valued."""
    ldap_filter: str = "(|(uid=%u)(mail=%s))"
    """%s is the SASL user name, %u its local part (the whole name when it has no @)."""
    ldap_cache_ttl: Duration = 300
    overrides_file: Path | None = None
    """More overrides, one per line: ``LIMIT KEY MAX`` or ``LIMIT KEY exempt`` (# comments); re-read when
    it changes. The config's own overrides win over the file's."""
    client_prefix_v4: Annotated[int, Field(ge=8, le=32)] = 32
    client_prefix_v6: Annotated[int, Field(ge=16, le=128)] = 64
    defer_text: str = "Sending limit reached; please try again later or contact the help desk"
    """What the client is told; by default no limit name or number (those are in the log line).
    Placeholders: {name}, {max}, {count}, {window}."""
    reject_text: str = "Sending limit reached; please contact the help desk"
    hold_text: str = "held: sending limit reached"
    """Logged by Postfix with the held message (the client is told nothing: the message is accepted)."""

    @field_validator("defer_text", "reject_text", "hold_text")
    @classmethod
    def _texts(cls, text: str) -> str:
        return check_template(text, {"name", "max", "count", "window"})

    @field_validator("limits")
    @classmethod
    def _unique(cls, limits: list[RateLimit]) -> list[RateLimit]:
        names = [limit.name for limit in limits]
        if len(names) != len(set(names)):
            raise ValueError("limit names must be unique")
        return limits

    @model_validator(mode="after")
    def _overrides_name_limits(self) -> RateLimitSettings:
        names = {limit.name for limit in self.limits}
        for override in self.overrides:
            if override.limit not in names:
                raise ValueError(f"override for unknown limit {override.limit!r}; limits: {', '.join(sorted(names))}")
        return self


def code_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    first = int(ipaddress.IPv4Address(low.strip()))
    last = int(ipaddress.IPv4Address(high.strip())) if high else first
    if last < first:
        raise ValueError(f"{text!r}: the range ends before it starts")
    return first, last


class DnsList(Section):
    zone: Annotated[str, Field(max_length=200, pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+\.?$")]
    weight: float = 1.0
    """Added when the list lists the client; negative for allow lists (DNSWL)."""
    codes: list[str] = []
    """Return codes that count, as addresses or ranges ("127.0.0.2", "127.0.0.2-127.0.0.11"); empty: any
    code in 127.0.0.0/8 except 127.255.255.0/24 (the codes lists use to say "query refused")."""
    name: str | None = None
    """Shown in the reply text and the log; the zone by default."""

    @field_validator("codes")
    @classmethod
    def _codes(cls, codes: list[str]) -> list[str]:
        for code in codes:
            try:
                code_range(code)
            except ValueError as exc:
                raise ValueError(f"bad return code {code!r}: {exc}") from None
        return codes

    @property
    def label(self) -> str:
        return self.name or self.zone.rstrip(".")


class DnsblSettings(Section):
    lists: list[DnsList] = []
    """The lists to ask. None by default: a site chooses lists whose terms it meets."""
    threshold: float = 1.0
    """Refuse when the weights of the listing lists add up to at least this."""
    budget: Duration = 1.5
    """Total time for all lookups of one request; a list not answered by then counts as not listed."""
    negative_ttl: Duration = 300
    """How long a "not listed" answer is cached (listed answers: the answer's own TTL)."""
    max_ttl: Duration = 3600
    action: Literal["reject", "defer"] = "reject"
    text: str = "Service unavailable; client [{client}] blocked using {lists}{lookup}"
    """Placeholders: {client}, {lists} (the public names of the lists that list it), {lookup}."""
    lookup_url: str | None = None
    """Where a refused sender can look its address up, e.g. "https://mx.example.org/blocked?ip={client}";
    {lookup} is then "; see <url>", else empty."""
    check_authenticated: bool = False
    """Look SASL-authenticated clients up too. Off by default: a user sending from home is often on a
    list of dynamic addresses (Spamhaus PBL) and must not be refused for it; they skip greylisting too."""

    @field_validator("text")
    @classmethod
    def _text(cls, text: str) -> str:
        return check_template(text, {"client", "lists", "lookup"})

    @field_validator("lookup_url")
    @classmethod
    def _url(cls, url: str | None) -> str | None:
        if url is not None:
            if not url.startswith(("https://", "http://")):
                raise ValueError("lookup_url must be an http(s) URL")
            check_template(url, {"client"})
        return url


SpfAction = Literal["reject", "defer", "header", "ignore"]


class SpfSettings(Section):
    """What each SPF result does: reject (550 5.7.23), defer (451 4.7.24), header (PREPEND Received-SPF)
    or ignore. Authenticated clients and trusted networks are not checked."""

    on_pass: SpfAction = "header"  # noqa: S105 - an SPF result, not a password
    on_fail: SpfAction = "reject"
    on_softfail: SpfAction = "header"
    on_neutral: SpfAction = "header"
    on_none: SpfAction = "header"
    on_temperror: SpfAction = "header"
    """A DNS problem at the sender's side; "defer" is the strict choice (the sender retries later)."""
    on_permerror: SpfAction = "header"
    timeout: Duration = 2.0
    """Time for the whole evaluation (all its DNS lookups); past it the result is temperror."""
    threads: Annotated[int, Field(ge=1, le=64)] = 8
    """pyspf is synchronous: evaluations run in this many worker threads."""
    cache_ttl: Duration = 300
    """Results are cached in Redis per client address and sender domain (or HELO name) this long; 0: off.
    pyspf is the costliest check per request: the cache takes it off every repeat sender."""
    reject_text: str = "SPF: {domain} does not allow {client} to send its mail"
    defer_text: str = "SPF: temporary error evaluating the policy of {domain}, please try again later"

    @field_validator("reject_text", "defer_text")
    @classmethod
    def _texts(cls, text: str) -> str:
        return check_template(text, {"domain", "client", "result"})


class FileSourceSettings(Section):
    """A recipient map: one address per line; ``@domain`` (every address of the domain exists); aliases
    as ``alias@domain: target@domain, other@domain``; ``#`` comments. Re-read when it changes."""

    paths: list[Path] = []


class SqlSourceSettings(Section):
    url: str | None = None
    """SQLAlchemy URL, e.g. "mysql+pymysql://user:password@db.example.org/mail" or "sqlite:////var/lib/x.db"."""
    query: SqlQuery = "SELECT address, active FROM recipients WHERE address = :address"
    """Returns a row when the address exists: first column the mailbox it delivers to, optional second column
    true/false for an active/disabled account. Parameters: :address, :local, :domain."""
    timeout: Duration = 2.0


class LdapSourceSettings(Section):
    servers: list[str] = []
    """ldap:// or ldaps:// URLs, tried in order: the second takes over when the first is down."""
    bind_dn: str | None = None
    bind_password: str | None = None
    base: str = ""
    filter: str = "(|(mail=%s)(mailAlternateAddress=%s))"
    """%s is the address (escaped), %u its local part, %d its domain."""
    mailbox_attribute: str = "mail"
    """The attribute naming the mailbox an address delivers to (for the quota check)."""
    status_attribute: str | None = "accountStatus"
    """Account status attribute; None when the directory has none."""
    active_values: list[str] = ["active"]
    """Status values that mean the account takes mail; an entry without the attribute counts as active."""
    timeout: Duration = 2.0
    connections: Annotated[int, Field(ge=1, le=32)] = 4

    @field_validator("servers")
    @classmethod
    def _urls(cls, servers: list[str]) -> list[str]:
        for url in servers:
            if not url.startswith(("ldap://", "ldaps://")):
                raise ValueError(f"{url!r}: an LDAP server is an ldap:// or ldaps:// URL")
        return servers

    @field_validator("filter")
    @classmethod
    def _filter(cls, text: str) -> str:
        if "%s" not in text and "%u" not in text:
            raise ValueError("the filter must use %s (the address) or %u (its local part)")
        if not (text.startswith("(") and text.endswith(")")):
            raise ValueError("an LDAP filter is enclosed in parentheses")
        return text


class RecipientSettings(Section):
    """Recipient verification: unknown recipients of our domains refused at RCPT, before any content."""

    domains: list[str] = []
    """Our domains; recipients elsewhere are not checked. Empty: every recipient is checked."""
    sources: list[Literal["file", "sql", "ldap"]] = ["file"]
    """Asked in order; the first that knows the address decides."""
    file: FileSourceSettings = Field(default_factory=FileSourceSettings)
    sql: SqlSourceSettings = Field(default_factory=SqlSourceSettings)
    ldap: LdapSourceSettings = Field(default_factory=LdapSourceSettings)
    recipient_delimiter: str = "+"
    """user+tag@domain is looked up as user@domain ("" to turn off)."""
    cache_ttl: Duration = 600
    negative_cache_ttl: Duration = 60
    unknown_text: str = "User unknown"
    disabled_text: str = "Mailbox disabled"

    @field_validator("domains")
    @classmethod
    def _lower(cls, domains: list[str]) -> list[str]:
        return [domain.lower().strip(".") for domain in domains]

    def missing(self) -> str | None:
        """What a configured source lacks (checked only when the recipients check is on)."""
        if "sql" in self.sources and not self.sql.url:
            return "recipients.sources names sql: set [policyd.recipients.sql] url"
        if "ldap" in self.sources and not self.ldap.servers:
            return "recipients.sources names ldap: set [policyd.recipients.ldap] servers"
        if "file" in self.sources and not self.file.paths:
            return "recipients.sources names file: set [policyd.recipients.file] paths"
        return None


class QuotaNotifySettings(Section):
    """At most one notice per interval to a user whose mail is being refused for a full mailbox."""

    relay: str | None = None
    """HOST:PORT of the SMTP server to send through, e.g. "127.0.0.1:25"; unset: no notices. The notice
    itself skips the quota check (sender = ``sender``, from a trusted network), so it can reach the full
    mailbox within the store's own grace (Dovecot's quota_grace)."""
    sender: str = "postmaster@localhost"
    interval: Duration = 86400
    subject: str = "Your mailbox is full: mail to you is being refused"
    text: str = (
        "Your mailbox {mailbox} is full. Mail sent to you is being refused (the senders are told to try\n"
        "again later) until you delete or archive some messages.\n"
    )
    """Subject and text are templates; placeholder: {mailbox}."""

    @field_validator("subject")
    @classmethod
    def _subject(cls, text: str) -> str:
        return check_template(text, {"mailbox"})

    @field_validator("text")
    @classmethod
    def _text(cls, text: str) -> str:
        return check_template(text, {"mailbox"}, one_line=False)

    @field_validator("relay")
    @classmethod
    def _relay(cls, relay: str | None) -> str | None:
        return relay if relay is None else listen_entry(relay)


class QuotaSettings(Section):
    """Over-quota rejection at the border: a recipient whose mailbox is full gets a temporary 452 4.2.2
    (or a permanent 552 5.2.2) at RCPT, instead of a bounce from the back end later."""

    sources: list[Literal["dovecot", "file"]] = ["dovecot"]
    dovecot: str = "127.0.0.1:12340"
    """Dovecot's quota-status service (``service quota-status { executable = quota-status -p postfix }``):
    HOST:PORT or unix:/path. Set its quota_status_success and quota_status_nouser to DUNNO."""
    file: Path | None = None
    """Over-quota users, one per line: ``address`` (over quota), or ``address used_bytes limit_bytes``
    (judged with the message size and the grace). Re-read when it changes."""
    grace_percent: Annotated[float, Field(ge=0, le=100)] = 0
    """For the file source: mail is still taken until usage passes the limit by this much."""
    permanent: bool = False
    """Answer 552 5.2.2 (the sender gives up) instead of 452 4.2.2 (the sender retries for days)."""
    timeout: Duration = 1.0
    text: str = "Mailbox is full"
    notify: QuotaNotifySettings = Field(default_factory=lambda: QuotaNotifySettings())

    @field_validator("dovecot")
    @classmethod
    def _address(cls, entry: str) -> str:
        return listen_entry(entry)

    def missing(self) -> str | None:
        if "file" in self.sources and self.file is None:
            return "quota.sources names file: set [policyd.quota] file"
        return None


class AccessSettings(Section):
    """The site's access rules (see rules/access.toml for the format)."""

    files: list[Path] = Field(default_factory=lambda: [shipped_rules_file("access.toml")])
    """Rules files, read in order; their rules are tried in that order."""
    check_interval: Duration = 5
    """How often the files are checked for changes (they are also re-read on SIGHUP)."""


class BlocklistSettings(Section):
    """Snagged accounts (and, optionally, client addresses) refused with 5.7.1."""

    check_clients: bool = True
    """Also refuse client addresses on the block list (one more key in the same Redis round trip)."""
    user_text: str = (
        "Your account has been blocked for security reasons; please contact the help desk"
    )
    client_text: str = "Mail from your address is blocked; please contact the postmaster"

    @field_validator("user_text", "client_text")
    @classmethod
    def _texts(cls, text: str) -> str:
        return check_template(text, {"user", "client"})


class PolicydSettings(Section):
    listen: list[str] = ["127.0.0.1:10023"]
    """TCP (host:port, [v6]:port) or unix:/path sockets; Postfix reuses connections, many at once."""
    checks: list[CheckName] = ["access", "blocklist", "ratelimit", "greylist"]
    """The pipeline, in order; the first decisive answer wins. Leave a check out to turn it off. The
    default is Postgrey's behaviour plus the site's rules, blocks and rate limits; the border checks
    (dnsbl, spf) are added by the site, in this order: access, blocklist, ratelimit, dnsbl, spf, greylist."""
    trusted_networks: list[Network] = [
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    ]
    """Clients Postfix permits as mynetworks: never greylisted. Keep it equal to Postfix's mynetworks."""
    answer_within: Duration = 2.0
    """Every request is answered within this time; past it the fail mode of the dependency applies."""
    request_timeout: Duration = 30
    """A request must arrive whole within this of its first byte (later bytes do not extend it), else the
    connection is closed."""
    idle_timeout: Duration = 600
    """A connection with nothing in flight is closed this long after its last answer (Postfix's
    smtpd_policy_service_max_idle is 300s)."""
    max_connections: Annotated[int, Field(ge=1)] = 4096
    """More are refused (counted, logged once per 10s); start-up refuses (exit 78) unless max_connections
    plus 64 descriptors fit in the open files limit."""
    max_line_bytes: Annotated[int, Field(ge=256)] = 8192
    max_request_bytes: Annotated[int, Field(ge=1024)] = 65536
    on_error: dict[Literal["redis", "dns", "ldap", "sql", "file", "quota"], FailModes] = Field(default_factory=dict)
    """Defaults: redis and dns fail open (dunno); the recipient directories (ldap, sql, file) defer, so an
    outage never turns into "user unknown" and never lets mail for unknown users in."""
    """Fail mode per dependency and per class of client; logged and counted when used."""
    hostname: str | None = None
    """Name used in the X-Greylist header; the machine's name by default."""
    access: AccessSettings = Field(default_factory=AccessSettings)
    dnsbl: DnsblSettings = Field(default_factory=DnsblSettings)
    spf: SpfSettings = Field(default_factory=SpfSettings)
    recipients: RecipientSettings = Field(default_factory=RecipientSettings)
    quota: QuotaSettings = Field(default_factory=QuotaSettings)
    greylist: GreylistSettings = Field(default_factory=GreylistSettings)
    ratelimit: RateLimitSettings = Field(default_factory=RateLimitSettings)
    blocklist: BlocklistSettings = Field(default_factory=BlocklistSettings)

    @field_validator("listen")
    @classmethod
    def _listen(cls, entries: list[str]) -> list[str]:
        if not entries:
            raise ValueError("at least one listen address is needed")
        return [listen_entry(entry) for entry in entries]

    @field_validator("checks")
    @classmethod
    def _no_repeats(cls, checks: list[str]) -> list[str]:
        if not checks:
            raise ValueError('at least one check is needed (an empty list would answer DUNNO to everything), '
                             'e.g. ["access", "greylist"]')
        if len(checks) != len(set(checks)):
            raise ValueError("a check may appear only once")
        return checks

    @model_validator(mode="after")
    def _sources_configured(self) -> PolicydSettings:
        if "recipients" in self.checks and (missing := self.recipients.missing()):
            raise ValueError(missing)
        if "quota" in self.checks and (missing := self.quota.missing()):
            raise ValueError(missing)
        if self.ratelimit.ldap_attribute and not self.recipients.ldap.servers:
            raise ValueError("ratelimit.ldap_attribute is read through [policyd.recipients.ldap]: set its servers")
        return self

    def fail_modes(self, dependency: str) -> FailModes:
        if dependency in self.on_error:
            return self.on_error[dependency]  # type: ignore[index]
        if dependency in ("ldap", "sql", "file"):
            return FailModes(inbound="defer_if_permit", authenticated="defer_if_permit")
        return FailModes()
