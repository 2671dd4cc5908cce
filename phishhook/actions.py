"""Snag actions: what happens to an account once the detector snags it, a configured list run in order.

Each action is logged (one logfmt line with the snag id and the action's name), counted
(``mailwarden_phish_actions_total{action,result}``) and returned as an ``ActionResult`` for the snag store;
an action that fails, raises or times out is a failed result and the next action still runs.

The list is split in two phases, each keeping the configured order:

- **immediate**: the blocks in Redis (``block-account``; the Redis part of ``block-address``), a round trip
  each, run inline by the detector: a phished account blasting spam must be refused at its next RCPT and
  its next IMAP login, not after a ticket has been mailed.
- **deferred**: everything slow (site commands, the firewall command, the ticket, the webhook), run by an
  ``ActionWorker`` thread so detection never waits on them.

``ActionRunner.run`` runs both phases in the configured order in one call (the CLI, tests).

**Alert mode** (``Evidence.mode == "alert"``: a site-wide alert-only setting, or a new account's learning
period) blocks nothing: ``block-account``, ``block-address`` (Redis and firewall) and site commands are
skipped (an ``ActionResult`` with ``skipped=True`` saying why), while the ticket and the webhook still run so
the security team hears of it. A site command that only notifies may set ``in_alert_mode = true``.

**Undo** ("confirm safe") lifts the account and address blocks, runs ``firewall_remove_command`` if set, and
nothing else: site commands (a scrambled password, removed groups) are not reversed, and the result says so,
so the security team knows to restore the account by hand.

What the ticket template reads from ``Evidence.details`` (every key optional; anything else is only in the
attached evidence.json):

- ``sightings``: a list of logins, each ``{"at": epoch, "address": str, "place": str, "distance_km": float,
  "hours": float, "speed_kmh": float}`` (distance, hours and speed relative to the previous login);
- ``messages``: the messages held, each ``{"queue_id": str, "sender": str, "header_from": str,
  "recipients": int, "subject": str, "at": epoch}``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import queue
import re
import selectors
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import redis
from pydantic import Field, field_validator, model_validator

from mailwarden.logs import get_logger, log_kv
from mailwarden.section import Section
from mailwarden.units import Duration, format_duration, format_time
from phishhook import metrics
from policyd.blocklist import BlockList
from policyd.settings_types import check_template
from quarantine.digest.outbox import Outbox, OutboxError
from quarantine.store import split_host_port

logger = get_logger("phishhook.actions")

TEMPLATES = Path(__file__).parent / "templates"
TICKET_TEMPLATE = "ticket.txt.j2"

ENFORCE = "enforce"
ALERT = "alert"
BLOCKED_BY = "phishhook"
"""The ``by`` of every block phishhook writes (``mailwarden block list`` shows it)."""

COMMAND_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OUTPUT_KEPT = 64 * 1024
"""Bytes of a command's stdout and of its stderr kept (the last ones); the rest is read and dropped."""
DETAIL_MAX = 500
"""Characters of a command's last stderr line (or of an error) kept in a result's detail."""
EXIT_GRACE = 1.0
"""Seconds a command's output is still read after it exited (a background child holding the pipes open is
not waited for)."""

USER_PLACEHOLDERS = ("{user}", "{snag}")
FIREWALL_PLACEHOLDERS = ("{address}", "{expires}", "{expires_s}")
SUBJECT_PLACEHOLDERS = {"user", "kind", "snag", "reason", "address", "mode"}


# -- what the detector gives and gets ------------------------------------------------------------------


@dataclass(frozen=True)
class Evidence:
    """Why an account was snagged: what every action acts on, and what commands and webhooks receive."""

    snag_id: str
    """The snag's public id (``mailwarden phish show ID``)."""
    user: str
    """The SASL login name."""
    kind: str
    """What tripped: ``geo-velocity``, ``outbound``, ... (the detector's words)."""
    reason: str
    """One line for people: "login from CN 1 h after US: 11,000 km at 11,000 km/h"."""
    source_address: str
    """The client address of the suspicious login or message; "" when none."""
    mode: str
    """``enforce``, or ``alert`` (alert-only site, or the account's learning period): nothing is blocked."""
    at: float
    """When the snag happened (epoch seconds)."""
    details: dict[str, Any] = field(default_factory=dict)
    """JSON-safe: sightings, distances, message envelopes (see the module docstring for what the ticket reads)."""
    review_url: str = ""
    """A link to the snag on the review page, "" when the page is not configured."""

    def __post_init__(self) -> None:
        if self.mode not in (ENFORCE, ALERT):
            raise ValueError(f"evidence mode {self.mode!r}: use {ENFORCE!r} or {ALERT!r}")

    def to_json(self) -> str:
        """The evidence as sent to commands (stdin), webhooks (body) and tickets (evidence.json)."""
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True, default=str)


class Outcome(StrEnum):
    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class ActionResult:
    name: str
    """The action's configured name; ``NAME/firewall`` for block-address's firewall command, ``NAME/undo``
    (and ``NAME/firewall-undo``) for what undo did."""
    ok: bool
    detail: str
    """What it did, or why it failed, for people; never a secret (no header values, no command output
    other than the last line of stderr of a failed command)."""
    seconds: float
    skipped: bool = False
    """Not attempted (ok stays True): alert mode, or nothing to do (no public source address)."""

    @property
    def outcome(self) -> Outcome:
        if self.skipped:
            return Outcome.SKIPPED
        return Outcome.OK if self.ok else Outcome.FAILED


# -- settings ------------------------------------------------------------------------------------------

ActionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
"""Letters, digits, ``.``, ``_``, ``-`` (it labels log lines and metrics)."""


def _check_argv(argv: list[str], allowed: Sequence[str]) -> list[str]:
    """Placeholders only as whole arguments, so a value (a login name with spaces or quotes) is one argument,
    never parsed, split or glued to an option."""
    if not argv or not argv[0]:
        raise ValueError("the command is empty: give the program and its arguments, e.g. "
                         "['/usr/local/sbin/scramble-password', '{user}']")
    for arg in argv:
        for placeholder in re.findall(r"\{[^{}\s]*\}", arg):
            if placeholder not in allowed:
                raise ValueError(f"unknown placeholder {placeholder} in {arg!r}; allowed: {', '.join(allowed)}")
            if arg != placeholder:
                raise ValueError(f"{arg!r}: a placeholder must be a whole argument (write ['--user', '{{user}}'], "
                                 f"not '--user={{user}}'); no shell is involved, so no quoting is needed")
    return argv


def _positive(value: float | None) -> float | None:
    if value is not None and value <= 0:
        raise ValueError("a block must last more than 0 seconds")
    return value


class BlockAccountAction(Section):
    """Block the SASL account in policyd's block list: policyd refuses its mail at RCPT (5.7.1), and
    phishhook's Dovecot auth policy endpoint refuses its IMAP/POP logins (the same Redis key)."""

    type: Literal["block-account"] = "block-account"
    name: ActionName = "block-account"
    expires: Duration | None = None
    """Seconds until the block lifts by itself; default none: it stays until the snag is confirmed safe."""

    @field_validator("expires")
    @classmethod
    def _expires(cls, value: float | None) -> float | None:
        return _positive(value)


class BlockAddressAction(Section):
    """Block the source address in policyd's block list (its mail refused whatever the account), and
    optionally at the border through ``firewall_command``. Skipped when there is no source address, or it
    is not a public one (private, loopback, link-local, ...): blocking 10.0.0.5 would block a campus host."""

    type: Literal["block-address"] = "block-address"
    name: ActionName = "block-address"
    expires: Duration = 30 * 86400
    """Seconds the address stays blocked, in Redis and in the firewall command's ``{expires}``; default 30d."""
    firewall_command: list[str] | None = None
    """Run after the Redis block (deferred), no shell: placeholders as whole arguments, ``{address}``,
    ``{expires}`` (whole seconds, "2592000") and ``{expires_s}`` ("2592000s", nft's form), e.g.
    ``["nft", "add", "element", "inet", "filter", "phish_block", "{", "{address}", "timeout", "{expires_s}",
    "}"]``; default none."""
    firewall_remove_command: list[str] | None = None
    """Its counterpart, run on undo (confirm safe), e.g. ``["nft", "delete", "element", "inet", "filter",
    "phish_block", "{", "{address}", "}"]``; default none."""
    timeout: Duration = 10
    """Seconds each firewall command may take before its process group is killed; default 10s."""

    @field_validator("expires")
    @classmethod
    def _expires(cls, value: float) -> float:
        return _positive(value) or value

    @field_validator("firewall_command", "firewall_remove_command")
    @classmethod
    def _argv(cls, argv: list[str] | None) -> list[str] | None:
        return None if argv is None else _check_argv(argv, FIREWALL_PLACEHOLDERS)


class CommandAction(Section):
    """A site command (scramble the password in LDAP, remove the account from groups ...): the evidence JSON
    on stdin, no shell, an environment of PATH, LANG, MAILWARDEN_SNAG and MAILWARDEN_USER only. Exit 0 is
    success; otherwise the last line of its stderr is the result's detail. Killed with its whole process
    group after ``timeout``."""

    type: Literal["command"] = "command"
    name: ActionName
    """Required: names the command in logs, metrics and the review page ("scramble-password")."""
    argv: list[str]
    """The program and its arguments; ``{user}`` and ``{snag}`` are replaced when they are a whole argument."""
    timeout: Duration = 30
    """Seconds before the command and every process it started are killed (SIGKILL); default 30s."""
    in_alert_mode: bool = False
    """Run it in alert mode too (a command that only notifies); default false: in alert mode it is skipped."""

    @field_validator("argv")
    @classmethod
    def _argv(cls, argv: list[str]) -> list[str]:
        return _check_argv(argv, USER_PLACEHOLDERS)


def _mailbox(address: str) -> str:
    if not re.fullmatch(r"[^\s@<>,]+@[^\s@<>,]+", address):
        raise ValueError(f"{address!r} is not an email address such as security@example.org")
    return address


class TicketAction(Section):
    """Mail a ticket to the security team: a text body (phishhook/templates/ticket.txt.j2: who, what, from
    where, the logins and the messages held, the review link) and the evidence as ``evidence.json``, sent
    through the suite's one SMTP sender (quarantine.digest.outbox.Outbox) to a Postfix listener."""

    type: Literal["ticket"] = "ticket"
    name: ActionName = "ticket"
    to: Annotated[list[str], Field(min_length=1)]
    """Required: the security team's (or the ticket system's) addresses."""
    from_address: str
    """Required: the From and envelope sender (a ticket system needs one to answer to)."""
    smtp: str = "127.0.0.1:25"
    """host:port of the Postfix listener (``[::1]:25`` for IPv6); default 127.0.0.1:25."""
    timeout: Duration = 30
    """Seconds for each SMTP step; default 30s."""
    subject: str = "[phishhook] {kind} snag of {user} ({snag})"
    """str.format placeholders: {user}, {kind}, {snag}, {reason}, {address}, {mode}."""
    templates: Path | None = None
    """A directory searched before the shipped templates for ticket.txt.j2 (a site's own wording); default none."""

    @field_validator("to")
    @classmethod
    def _to(cls, addresses: list[str]) -> list[str]:
        return [_mailbox(address) for address in addresses]

    @field_validator("from_address")
    @classmethod
    def _from(cls, address: str) -> str:
        return _mailbox(address)

    @field_validator("smtp")
    @classmethod
    def _smtp(cls, value: str) -> str:
        split_host_port(value)
        return value

    @field_validator("subject")
    @classmethod
    def _subject(cls, text: str) -> str:
        return check_template(text, SUBJECT_PLACEHOLDERS)


class WebhookAction(Section):
    """POST the evidence JSON to a URL; a 2xx answer is success. Redirects are not followed (a POST turned
    into a GET would lose the evidence): a 3xx is a failure naming where it pointed."""

    type: Literal["webhook"] = "webhook"
    name: ActionName = "webhook"
    url: str
    """Required: http:// or https:// (certificates verified against the system's CAs)."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra request headers, e.g. ``{"Authorization": "Bearer ..."}``; never logged."""
    timeout: Duration = 10
    """Seconds for connecting and for each read; default 10s."""
    proxy: str | None = None
    """An HTTP proxy URL; default none: the environment's http_proxy is not used either."""

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        return url

    @field_validator("headers")
    @classmethod
    def _headers(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise ValueError(f"{name!r} is not a header name")
            if "\r" in value or "\n" in value:
                raise ValueError(f"the value of header {name} must be one line")
        return headers


ActionSettings = Annotated[BlockAccountAction | BlockAddressAction | CommandAction | TicketAction | WebhookAction,
                           Field(discriminator="type")]


def _default_run() -> list[ActionSettings]:
    return [BlockAccountAction(), BlockAddressAction()]


class ActionsSettings(Section):
    """The snag actions, run in this order (blocks first in practice: they run inline, the rest after)."""

    run: list[ActionSettings] = Field(default_factory=lambda: _default_run())
    """Each a table with ``type`` = block-account, block-address, command, ticket or webhook; default: block
    the account, then the source address. Names must differ (give two webhooks their own ``name``)."""

    @model_validator(mode="after")
    def _unique_names(self) -> ActionsSettings:
        seen: set[str] = set()
        for action in self.run:
            if action.name in seen:
                raise ValueError(f"two snag actions are named {action.name!r}: give each its own name")
            seen.add(action.name)
        return self


# -- running -------------------------------------------------------------------------------------------


class Phase(Enum):
    IMMEDIATE = "immediate"
    DEFERRED = "deferred"


@dataclass(frozen=True)
class _Done:
    ok: bool
    detail: str
    skipped: bool = False


@dataclass(frozen=True)
class _Step:
    name: str
    phase: Phase
    alert: str | None
    """In alert mode: None to run anyway, else the detail of the skipped result."""
    do: Callable[[Evidence], _Done]


NOT_BLOCKED = "alert-only: not blocked"
NOT_RUN = "alert-only: not run"


class ActionRunner:
    """Runs the configured actions for one snag; thread-safe as long as the Redis client is (redis-py's is)."""

    def __init__(self, settings: ActionsSettings, redis_client: redis.Redis, key_prefix: str,
                 now: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.blocklist = BlockList(redis_client, key_prefix)
        self.now = now
        self._steps: list[_Step] = []
        self._undo: list[_Step] = []
        for action in settings.run:
            self._compile(action)

    def _compile(self, action: ActionSettings) -> None:
        name = action.name
        if isinstance(action, BlockAccountAction):
            self._steps.append(_Step(name, Phase.IMMEDIATE, NOT_BLOCKED, _BlockAccount(action, self.blocklist).do))
            self._undo.append(_Step(f"{name}/undo", Phase.IMMEDIATE, None, _BlockAccount(action, self.blocklist).undo))
        elif isinstance(action, BlockAddressAction):
            block = _BlockAddress(action, self.blocklist)
            self._steps.append(_Step(name, Phase.IMMEDIATE, NOT_BLOCKED, block.do))
            self._undo.append(_Step(f"{name}/undo", Phase.IMMEDIATE, None, block.undo))
            if action.firewall_command:
                self._steps.append(_Step(f"{name}/firewall", Phase.DEFERRED, NOT_BLOCKED, block.firewall))
            if action.firewall_remove_command:
                self._undo.append(_Step(f"{name}/firewall-undo", Phase.DEFERRED, None, block.firewall_undo))
        elif isinstance(action, CommandAction):
            command = _Command(action)
            self._steps.append(_Step(name, Phase.DEFERRED, None if action.in_alert_mode else NOT_RUN, command.do))
            self._undo.append(_Step(f"{name}/undo", Phase.DEFERRED, None, command.undo))
        elif isinstance(action, TicketAction):
            self._steps.append(_Step(name, Phase.DEFERRED, None, _Ticket(action, self.now).do))
        else:
            self._steps.append(_Step(name, Phase.DEFERRED, None, _Webhook(action).do))

    def run(self, evidence: Evidence, on_result: Callable[[ActionResult], None] | None = None) -> list[ActionResult]:
        """Every action in the configured order, both phases, in this thread."""
        return self._run(self._steps, evidence, on_result)

    def immediate(self, evidence: Evidence,
                  on_result: Callable[[ActionResult], None] | None = None) -> list[ActionResult]:
        """The blocks in Redis (milliseconds): run them inline, before answering the login or the message."""
        return self._run([step for step in self._steps if step.phase is Phase.IMMEDIATE], evidence, on_result)

    def deferred(self, evidence: Evidence,
                 on_result: Callable[[ActionResult], None] | None = None) -> list[ActionResult]:
        """The slow rest (commands, firewall, ticket, webhook): hand it to an ActionWorker,
        ``worker.submit(evidence, runner.deferred)`` (or a lambda passing ``on_result``)."""
        return self._run([step for step in self._steps if step.phase is Phase.DEFERRED], evidence, on_result)

    def has_deferred(self) -> bool:
        return any(step.phase is Phase.DEFERRED for step in self._steps)

    def undo(self, evidence: Evidence, on_result: Callable[[ActionResult], None] | None = None) -> list[ActionResult]:
        """Confirm safe: lift the account and address blocks, run firewall_remove_command; site commands are
        not reversed (their result says so). Runs whatever the evidence's mode."""
        return self._run(self._undo, evidence, on_result)

    def _run(self, steps: list[_Step], evidence: Evidence,
             on_result: Callable[[ActionResult], None] | None) -> list[ActionResult]:
        results = []
        for step in steps:
            result = self._one(step, evidence)
            results.append(result)
            if on_result is not None:
                try:
                    on_result(result)
                except Exception:
                    logger.exception("storing a snag action's result failed", extra={"kv": {
                        "snag": evidence.snag_id, "action": step.name}})
        return results

    def _one(self, step: _Step, evidence: Evidence) -> ActionResult:
        start = time.monotonic()
        if evidence.mode == ALERT and step.alert is not None:
            done = _Done(True, step.alert, skipped=True)
        else:
            try:
                done = step.do(evidence)
            except redis.RedisError as exc:
                done = _Done(False, _bounded(f"Redis: {exc}"))
            except Exception as exc:
                logger.exception("snag action raised", extra={"kv": {"snag": evidence.snag_id, "action": step.name}})
                done = _Done(False, _bounded(f"{type(exc).__name__}: {exc}"))
        result = ActionResult(step.name, done.ok, done.detail, time.monotonic() - start, done.skipped)
        metrics.ACTIONS.labels(step.name, result.outcome.value).inc()
        log_kv(logger, logging.INFO if result.ok else logging.WARNING, "snag action", snag=evidence.snag_id,
               user=evidence.user, action=step.name, result=result.outcome.value, seconds=round(result.seconds, 3),
               detail=result.detail)
        return result


def _bounded(text: str, limit: int = DETAIL_MAX) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _block_reason(evidence: Evidence) -> str:
    return _bounded(f"phishhook snag {evidence.snag_id}: {evidence.reason}", 200)


class _BlockAccount:
    def __init__(self, settings: BlockAccountAction, blocklist: BlockList) -> None:
        self.settings, self.blocklist = settings, blocklist

    def do(self, evidence: Evidence) -> _Done:
        if not evidence.user.strip():
            return _Done(True, "no account to block: the evidence names no user", skipped=True)
        expires = self.settings.expires
        entry = self.blocklist.add("user", evidence.user, _block_reason(evidence), BLOCKED_BY, expires)
        until = f"for {format_duration(expires)}" if expires else "until confirmed safe"
        return _Done(True, f"account {entry.value} blocked {until}: its mail is refused at RCPT, its IMAP/POP "
                           f"logins are refused")

    def undo(self, evidence: Evidence) -> _Done:
        if not evidence.user.strip():
            return _Done(True, "no account to unblock: the evidence names no user", skipped=True)
        if self.blocklist.remove("user", evidence.user):
            return _Done(True, f"account {evidence.user.strip().lower()} unblocked")
        return _Done(True, f"account {evidence.user.strip().lower()} was not blocked (lifted or expired already)")


def public_address(text: str) -> tuple[str | None, str]:
    """(the address in canonical form, "") when it may be blocked, else (None, why not)."""
    if not text.strip():
        return None, "no source address to block"
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None, _bounded(f"source address {text!r} is not an IP address: not blocked")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_unspecified or ip.is_multicast or \
            ip.is_reserved or ip in _SHARED:
        return None, f"source address {ip.compressed} is not public (private, loopback or reserved): not blocked"
    return ip.compressed, ""


_SHARED = ipaddress.ip_network("100.64.0.0/10")
"""Carrier-grade NAT: an address shared by many customers of one carrier."""


class _BlockAddress:
    def __init__(self, settings: BlockAddressAction, blocklist: BlockList) -> None:
        self.settings, self.blocklist = settings, blocklist

    def do(self, evidence: Evidence) -> _Done:
        address, why = public_address(evidence.source_address)
        if address is None:
            return _Done(True, why, skipped=True)
        self.blocklist.add("client", address, _block_reason(evidence), BLOCKED_BY, self.settings.expires)
        return _Done(True, f"address {address} blocked for {format_duration(self.settings.expires)}")

    def undo(self, evidence: Evidence) -> _Done:
        address, why = public_address(evidence.source_address)
        if address is None:
            return _Done(True, why.replace("not blocked", "nothing to unblock"), skipped=True)
        if self.blocklist.remove("client", address):
            return _Done(True, f"address {address} unblocked")
        return _Done(True, f"address {address} was not blocked (lifted or expired already)")

    def firewall(self, evidence: Evidence) -> _Done:
        assert self.settings.firewall_command is not None
        return self._firewall(evidence, self.settings.firewall_command, "blocked at the border")

    def firewall_undo(self, evidence: Evidence) -> _Done:
        assert self.settings.firewall_remove_command is not None
        return self._firewall(evidence, self.settings.firewall_remove_command, "unblocked at the border")

    def _firewall(self, evidence: Evidence, argv: list[str], what: str) -> _Done:
        address, why = public_address(evidence.source_address)
        if address is None:
            return _Done(True, why, skipped=True)
        seconds = str(round(self.settings.expires))
        values = {"{address}": address, "{expires}": seconds, "{expires_s}": f"{seconds}s"}
        done = run_bounded([values.get(arg, arg) for arg in argv], b"", _command_env({}), self.settings.timeout)
        return done.judge(argv[0], self.settings.timeout, f"address {address} {what}")


class _Command:
    def __init__(self, settings: CommandAction) -> None:
        self.settings = settings

    def do(self, evidence: Evidence) -> _Done:
        values = {"{user}": evidence.user, "{snag}": evidence.snag_id}
        argv = [values.get(arg, arg) for arg in self.settings.argv]
        env = _command_env({"MAILWARDEN_SNAG": evidence.snag_id, "MAILWARDEN_USER": evidence.user})
        done = run_bounded(argv, evidence.to_json().encode(), env, self.settings.timeout)
        return done.judge(self.settings.argv[0], self.settings.timeout, "done")

    def undo(self, evidence: Evidence) -> _Done:
        return _Done(True, f"not undone: site commands are not reversed; undo by hand what "
                           f"{self.settings.argv[0]} did (password, groups)", skipped=True)


def _command_env(extra: dict[str, str]) -> dict[str, str]:
    """Nothing of the daemon's own environment (a Redis password, a proxy) reaches a site command."""
    return {"PATH": COMMAND_PATH, "LANG": "C.UTF-8", **extra}


# -- bounded commands ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Completed:
    """How a bounded command ended."""

    returncode: int | None
    """None when it was killed at its timeout."""
    stdout: bytes
    """The last OUTPUT_KEPT bytes."""
    stderr: bytes
    timed_out: bool
    error: str = ""
    """Why it could not be started ("" when it ran)."""

    def judge(self, program: str, timeout: float, success: str) -> _Done:
        if self.error:
            return _Done(False, self.error)
        if self.timed_out:
            return _Done(False, f"timed out after {format_duration(timeout)}: {program} and the processes it "
                                f"started were killed")
        last = last_line(self.stderr)
        if self.returncode == 0:
            return _Done(True, f"{success} ({program}: exit 0)")
        assert self.returncode is not None
        if self.returncode < 0:
            how = f"{program} killed by {_signal_name(-self.returncode)}"
        else:
            how = f"{program} failed with exit {self.returncode}"
        return _Done(False, f"{how}: {last}" if last else f"{how} (nothing on stderr)")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def last_line(output: bytes) -> str:
    """The last non-blank line, without control characters, at most DETAIL_MAX characters."""
    for line in reversed(output.decode("utf-8", "replace").splitlines()):
        cleaned = "".join(char if char.isprintable() else " " for char in line).strip()
        if cleaned:
            return _bounded(cleaned)
    return ""


def run_bounded(argv: list[str], stdin: bytes, env: dict[str, str], timeout: float,
                keep: int = OUTPUT_KEPT) -> Completed:
    """Run ``argv`` (no shell) in a session of its own, feed it ``stdin``, keep the tail of its output and
    SIGKILL its whole process group when ``timeout`` passes: a hanging ``ldapmodify`` and the ``ssh`` it
    started both go."""
    deadline = time.monotonic() + timeout
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, cwd="/", start_new_session=True, close_fds=True)
    except OSError as exc:
        return Completed(None, b"", b"", False, _bounded(f"cannot run {argv[0]}: {exc.strerror or exc}"))
    except ValueError as exc:  # an argument with a NUL character
        return Completed(None, b"", b"", False, _bounded(f"cannot run {argv[0]}: {exc}"))
    try:
        exited, stdout, stderr = _pump(proc, stdin, deadline, keep)
        if not exited:
            _kill_group(proc)
        proc.wait()
        return Completed(proc.returncode if exited else None, stdout, stderr, not exited)
    finally:
        if proc.poll() is None:  # an exception on the way: nothing it started outlives the action
            _kill_group(proc)
            proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):  # gone meanwhile, and everything it started with it
        os.killpg(proc.pid, signal.SIGKILL)


def _pump(proc: subprocess.Popen[bytes], data: bytes, deadline: float, keep: int) -> tuple[bool, bytes, bytes]:
    """Write stdin, read stdout and stderr (keeping their last ``keep`` bytes) until the process exited and
    its pipes closed (or EXIT_GRACE after it exited); returns (exited before ``deadline``, stdout, stderr)."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stdout, stderr = bytearray(), bytearray()
    selector = selectors.DefaultSelector()
    pidfd: int | None = None
    try:
        try:
            pidfd = os.pidfd_open(proc.pid)
            selector.register(pidfd, selectors.EVENT_READ, "exit")
        except (AttributeError, OSError):
            pidfd = None  # no pidfd (not Linux 5.3+): poll for the exit below
        selector.register(proc.stdout, selectors.EVENT_READ, stdout)
        selector.register(proc.stderr, selectors.EVENT_READ, stderr)
        pending = memoryview(data)
        if pending:
            os.set_blocking(proc.stdin.fileno(), False)
            selector.register(proc.stdin, selectors.EVENT_WRITE, "stdin")
        else:
            proc.stdin.close()
        exited_at: float | None = None
        readers = 2
        while True:
            now = time.monotonic()
            if exited_at is None and pidfd is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and (readers == 0 or now >= exited_at + EXIT_GRACE):
                return True, bytes(stdout), bytes(stderr)
            limit = deadline if exited_at is None else min(deadline, exited_at + EXIT_GRACE)
            if now >= limit:
                return exited_at is not None, bytes(stdout), bytes(stderr)
            wait = limit - now if pidfd is not None else min(limit - now, 0.05)
            for key, _mask in selector.select(wait):
                if key.data == "exit":
                    selector.unregister(key.fileobj)
                    exited_at = time.monotonic()
                elif key.data == "stdin":
                    try:
                        written = os.write(proc.stdin.fileno(), pending[:65536])
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # it does not read its stdin: fine
                        written = len(pending)
                    pending = pending[written:]
                    if not pending:
                        selector.unregister(proc.stdin)
                        proc.stdin.close()
                else:
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fileobj)
                        readers -= 1
                        continue
                    buffer: bytearray = key.data
                    buffer += chunk
                    if len(buffer) > keep:
                        del buffer[:len(buffer) - keep]
    finally:
        selector.close()
        if pidfd is not None:
            os.close(pidfd)


# -- ticket --------------------------------------------------------------------------------------------


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _sighting_rows(details: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for item in details.get("sightings") or []:
        if not isinstance(item, dict):
            continue
        at, distance = _number(item.get("at")), _number(item.get("distance_km"))
        hours, speed = _number(item.get("hours")), _number(item.get("speed_kmh"))
        rows.append({
            "time": format_time(at) if at is not None else "",
            "address": str(item.get("address") or ""),
            "place": str(item.get("place") or "unknown place"),
            "distance": f"{distance:,.0f} km" if distance is not None else "",
            "hours": f"{hours:.1f} h" if hours is not None else "",
            "speed": f"{speed:,.0f} km/h" if speed is not None else "",
        })
    return rows


def _message_rows(details: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for item in details.get("messages") or []:
        if not isinstance(item, dict):
            continue
        at = _number(item.get("at"))
        rows.append({
            "time": format_time(at) if at is not None else "",
            "queue_id": str(item.get("queue_id") or ""),
            "sender": str(item.get("sender") or "<>"),
            "header_from": str(item.get("header_from") or ""),
            "recipients": str(item.get("recipients") if item.get("recipients") is not None else ""),
            "subject": _bounded(str(item.get("subject") or ""), 120),
        })
    return rows


def _one_line(text: str) -> str:
    return " ".join("".join(char if char.isprintable() else " " for char in text).split())


class _Ticket:
    def __init__(self, settings: TicketAction, now: Callable[[], float]) -> None:
        self.settings, self.now = settings, now
        import jinja2  # only where a ticket is configured: every mailwarden command loads these settings

        loaders: list[jinja2.BaseLoader] = []
        if settings.templates:
            loaders.append(jinja2.FileSystemLoader(settings.templates))
        loaders.append(jinja2.FileSystemLoader(TEMPLATES))
        environment = jinja2.Environment(loader=jinja2.ChoiceLoader(loaders), autoescape=False,  # noqa: S701 text
                                         undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                                         trim_blocks=True, lstrip_blocks=True)
        self.template = environment.get_template(TICKET_TEMPLATE)  # a missing template fails at start-up

    def render(self, evidence: Evidence) -> str:
        sightings = _sighting_rows(evidence.details)
        columns = ("time", "address", "place", "distance", "hours", "speed")
        widths = {column: max([len(column), *(len(row[column]) for row in sightings)]) for column in columns}
        return self.template.render(
            evidence=evidence, user=evidence.user, kind=evidence.kind, reason=evidence.reason,
            snag=evidence.snag_id, source_address=evidence.source_address, alert=evidence.mode == ALERT,
            when=format_time(evidence.at), sightings=sightings, columns=columns, widths=widths,
            messages=_message_rows(evidence.details), review_url=evidence.review_url)

    def message(self, evidence: Evidence) -> EmailMessage:
        message = EmailMessage()
        subject = self.settings.subject.format(
            user=evidence.user, kind=evidence.kind, snag=evidence.snag_id, reason=evidence.reason,
            address=evidence.source_address or "no address", mode=evidence.mode)
        message["Subject"] = _bounded(_one_line(subject), 200)
        message["From"] = self.settings.from_address
        message["To"] = ", ".join(self.settings.to)
        message["Date"] = formatdate(self.now(), localtime=True)
        message["Message-ID"] = make_msgid("phishhook", self.settings.from_address.rpartition("@")[2])
        message["Auto-Submitted"] = "auto-generated"
        message.set_content(self.render(evidence))
        message.add_attachment(evidence.to_json().encode(), maintype="application", subtype="json",
                               filename="evidence.json")
        return message

    def do(self, evidence: Evidence) -> _Done:
        message = self.message(evidence)
        sent, failed = [], []
        with Outbox.to_listener(self.settings.smtp, self.settings.timeout,
                                f"the smtp setting of the ticket action {self.settings.name!r}") as outbox:
            for recipient in self.settings.to:
                try:
                    queue_id = outbox.send(message, recipient, sender=self.settings.from_address)
                except OutboxError as exc:
                    failed.append(str(exc))
                else:
                    sent.append(f"{recipient} (queued as {queue_id})" if queue_id else recipient)
        text = f"ticket sent to {', '.join(sent)}" if sent else "no ticket sent"
        if failed:
            return _Done(False, _bounded(f"{text}; {'; '.join(failed)}"))
        return _Done(True, text)


# -- webhook -------------------------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        return None  # the 3xx then surfaces as an HTTPError


def _shown(url: str) -> str:
    """The URL without credentials or query (a token often travels there)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class _Webhook:
    def __init__(self, settings: WebhookAction) -> None:
        self.settings = settings
        proxies = {"http": settings.proxy, "https": settings.proxy} if settings.proxy else {}
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies), _NoRedirect())

    def do(self, evidence: Evidence) -> _Done:
        where = _shown(self.settings.url)
        headers = {"Content-Type": "application/json", "User-Agent": "mailwarden-phishhook", **self.settings.headers}
        body = evidence.to_json().encode()
        # the scheme is http or https: checked at start-up
        request = urllib.request.Request(self.settings.url, data=body, method="POST", headers=headers)  # noqa: S310
        try:
            with self.opener.open(request, timeout=self.settings.timeout) as response:
                response.read(OUTPUT_KEPT)
                status = response.status
        except urllib.error.HTTPError as exc:
            exc.close()
            moved = f" (redirect to {_shown(exc.headers.get('Location', ''))}: not followed)" \
                if 300 <= exc.code < 400 and exc.headers.get("Location") else ""
            return _Done(False, _bounded(f"{where} answered {exc.code} {exc.reason}{moved}"))
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                return _Done(False, f"{where} timed out after {format_duration(self.settings.timeout)}")
            return _Done(False, _bounded(f"cannot reach {where}: {getattr(reason, 'strerror', None) or reason}"))
        except TimeoutError:
            return _Done(False, f"{where} timed out after {format_duration(self.settings.timeout)}")
        except OSError as exc:
            return _Done(False, _bounded(f"cannot reach {where}: {exc.strerror or exc}"))
        if 200 <= status < 300:
            return _Done(True, f"posted to {where} ({status})")
        return _Done(False, f"{where} answered {status}")


# -- the worker ----------------------------------------------------------------------------------------


class ActionWorker:
    """One thread running the deferred actions of snag after snag, in the order submitted, so detection
    never waits on a ticket or a site command. ``close(timeout)`` lets it finish within a bound and logs
    (and returns) the snags whose deferred actions were left undone."""

    def __init__(self, name: str = "phish-actions") -> None:
        self._queue: queue.Queue[tuple[Evidence, Callable[[Evidence], object]] | None] = queue.Queue()
        self._closed = False
        self._abandoned = threading.Event()
        self._lock = threading.Lock()
        self._current: Evidence | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, evidence: Evidence, actions: Callable[[Evidence], object]) -> None:
        """Queue ``actions(evidence)``, typically ``runner.deferred``; raises RuntimeError once closed."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the snag action worker is closed: run the actions inline or restart")
            self._queue.put((evidence, actions))

    def pending(self) -> int:
        """Snags queued and not started."""
        return self._queue.qsize()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._abandoned.is_set():
                continue
            evidence, actions = item
            self._current = evidence
            try:
                actions(evidence)
            except Exception:
                logger.exception("snag actions raised", extra={"kv": {"snag": evidence.snag_id}})
            finally:
                self._current = None

    def close(self, timeout: float) -> list[Evidence]:
        """Stop taking work, wait up to ``timeout`` seconds for the queue to drain; returns (and logs) the
        snags left undone: not started, or still running at the bound (a command stays bounded by its own
        timeout)."""
        with self._lock:
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            return []
        self._abandoned.set()
        undone = []
        running = self._current
        if running is not None:
            undone.append(running)
            log_kv(logger, logging.WARNING, "snag actions still running at shutdown", snag=running.snag_id,
                   user=running.user)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                undone.append(item[0])
                log_kv(logger, logging.WARNING, "snag actions left undone at shutdown", snag=item[0].snag_id,
                       user=item[0].user)
        self._queue.put(None)  # the thread ends after its current job
        return undone
