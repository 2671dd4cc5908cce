"""``mailwarden spam learn`` and ``mailwarden spam check``: Bayes training through spamd, and what the
SpamAssassin milter would decide about a message, without delivering anything.

Exit codes: 0 done; 1 nothing learned (every message already learned so, or none found); 2 bad usage (no
recipient to judge for, an unreadable path); 69 spamd (or the preferences store) unavailable; 78 bad config.
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import email.utils
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from mailwarden.cli import EX_UNAVAILABLE, CliContext, emit, fail
from milters.check import Message
from milters.mailbox import MailboxResolver
from milters.spam_learning import learn, messages_in
from milters.spamassassin import SpamAssassinCheck, SpamAssassinSettings
from milters.spamd_client import SpamdClient, SpamdError
from milters.spool import Spool
from milters.verdict import Verdict, for_recipient
from quarantine.preferences import SpamPreferences
from quarantine.store import QuarantineStore, StoreError


@click.group("spam")
def spam_group() -> None:
    """Joined into ``mailwarden spam`` (quarantine/capability.py, SPAM_COMMANDS)."""


@contextlib.contextmanager
def spamd_client(settings: SpamAssassinSettings) -> Iterator[SpamdClient]:
    client = SpamdClient(settings.spamd)
    try:
        yield client
    finally:
        client.close()


@spam_group.command("learn")
@click.option("--spam", "kind", flag_value="spam", help="Learn these messages as spam.")
@click.option("--ham", "kind", flag_value="ham", help="Learn these messages as ham (not spam).")
@click.option("--user", metavar="USER", help="Whose Bayes database (a mailbox); default the shared one "
                                             "([milters.spamassassin] shared_user).")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@click.argument("paths", metavar="PATH...", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.pass_obj
def learn_command(ctx: CliContext, kind: str | None, user: str | None, as_json: bool, paths: tuple[Path, ...]) -> None:
    """Train spamd's Bayes with messages: files, maildirs, directories of files, mbox files."""
    if kind not in ("spam", "ham"):
        raise click.UsageError("say what the messages are: --spam or --ham")
    settings: SpamAssassinSettings = ctx.load().section("milters").spamassassin
    who = user or settings.shared_user
    counts = {"learned": 0, "already": 0}
    with spamd_client(settings) as client:
        try:
            for source in messages_in(list(paths)):
                counts["learned" if learn(client, source.data, who, kind) else "already"] += 1  # type: ignore[arg-type]
        except SpamdError as exc:
            fail(f"spamd: {exc} ({counts['learned']} learned before it)", EX_UNAVAILABLE)
        except (OSError, ValueError) as exc:
            fail(f"{exc}", 2)
    report = {"ok": counts["learned"] > 0, "user": who, "kind": kind, **counts}
    emit(report, as_json, f"{who}: {counts['learned']} learned as {kind}, {counts['already']} already known")
    if not counts["learned"]:
        raise SystemExit(1)


@spam_group.command("check")
@click.argument("path", metavar="FILE", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--rcpt", "recipients", multiple=True, metavar="ADDRESS",
              help="A recipient to judge for (repeatable); default the To and Cc addresses.")
@click.option("--sender", metavar="ADDRESS", help="The envelope sender; default the From address.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def check_command(ctx: CliContext, path: Path, recipients: tuple[str, ...], sender: str | None,
                  as_json: bool) -> None:
    """Score a message with spamd as the milter would: the score, the rules hit and each recipient's
    verdict (levels and sender lists included). Nothing is delivered or held."""
    config = ctx.load()
    settings: SpamAssassinSettings = config.section("milters").spamassassin
    message = _message(path.read_bytes(), recipients, sender)
    if not message.recipients:
        fail(f"{path}: no To or Cc address to judge for: give --rcpt", 2)
    directory = config.section("policyd").recipients
    resolver = MailboxResolver(directory, 0)
    store = QuarantineStore(config.section("quarantine"))
    try:
        check = SpamAssassinCheck(settings, resolver, SpamPreferences(store, cache_ttl=0))
        try:
            assessment = check.assess(message)
        except SpamdError as exc:
            fail(f"spamd: {exc}", EX_UNAVAILABLE)
        finally:
            check.close()
    except StoreError as exc:
        fail(str(exc), EX_UNAVAILABLE)
    finally:
        store.close()
        resolver.close()
        message.spool.close()
    report = assessment.report
    verdicts = {rcpt: for_recipient(assessment.result, rcpt) for rcpt in message.recipients}
    result: dict[str, Any] = {
        "ok": True, "file": str(path), "spamd_user": assessment.user,
        "score": report.score if report else None, "partial": report.partial if report else False,
        "rules": [{"name": r.name, "score": r.score, "description": r.description} for r in report.rules]
        if report else [],
        "recipients": [_recipient(rcpt, assessment.mailboxes.get(rcpt, ""), verdict)
                       for rcpt, verdict in verdicts.items()]}
    emit(result, as_json, _text(result))


def _message(raw: bytes, recipients: tuple[str, ...], sender: str | None) -> Message:
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
    headers = [(name, str(value)) for name, value in parsed.items()]
    if not recipients:
        found = email.utils.getaddresses(parsed.get_all("To", []) + parsed.get_all("Cc", []))
        recipients = tuple(address for _name, address in found if "@" in address)
    if sender is None:
        sender = email.utils.parseaddr(parsed.get("From", ""))[1]
    spool = Spool()
    spool.write(raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    return Message(queue_id="", client_address="", client_name="", helo="", sender=sender,
                   recipients=list(dict.fromkeys(recipients)), auth_user="", headers=headers, spool=spool)


def _recipient(rcpt: str, mailbox_address: str, verdict: Verdict | None) -> dict[str, Any]:
    return {"recipient": rcpt, "mailbox": mailbox_address, "fate": str(verdict.fate) if verdict else "accept",
            "reason": verdict.reason if verdict else ""}


def _text(result: dict[str, Any]) -> str:
    lines = []
    if result["score"] is None:
        lines.append("not scored (every recipient's sender lists decided)")
    else:
        partial = " (partial: the start of each part)" if result["partial"] else ""
        lines.append(f"score {result['score']:g} as {result['spamd_user']}{partial}")
        for rule in result["rules"]:
            score = "" if rule["score"] is None else f"{rule['score']:6.1f}"
            lines.append(f"  {score:>6} {rule['name']:28} {rule['description']}".rstrip())
    for rcpt in result["recipients"]:
        mailbox_note = f" (mailbox {rcpt['mailbox']})" if rcpt["mailbox"] and rcpt["mailbox"] != rcpt["recipient"] \
            else ""
        lines.append(f"{rcpt['recipient']}{mailbox_note}: {rcpt['fate']}: {rcpt['reason']}")
    return "\n".join(lines)

