"""``mailwarden digest reply`` (Postfix's pipe transport runs it for each reply) and ``digest events``
(the security team's list of refused replies). The ``digest`` group joins this module's commands and
send_cli.py's (capability.py).

``digest reply`` reads the reply on stdin. Its exit code is what Postfix's pipe(8) acts on:

- 0 for every reply it decided, refused ones too: a non-zero exit other than 75 makes Postfix bounce the
  reply to its envelope sender, and a forged sender must never get a bounce (backscatter);
- 75 (EX_TEMPFAIL) when the store, the recipient sources, the re-injection listener or the config cannot
  be used now: Postfix keeps the reply and tries again (actions done before the failure are not done
  twice: the retry says "already done").

Start-up stays light: reply.py (and through it the store, SQLAlchemy, Jinja2) is imported when the command
runs, not when ``mailwarden`` lists its commands.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import time
from typing import Any

import click

from mailwarden.cli import EX_UNAVAILABLE, CliContext, emit, fail

EX_TEMPFAIL = os.EX_TEMPFAIL
MAX_READ = 8 << 20
"""Bytes of a reply read from stdin (the parser reads 4 MB; the rest is drained, not kept)."""


@click.group("digest")
def digest_group() -> None:
    """Commands of reply.py."""


@digest_group.command("reply")
@click.option("--sender", default="", help="The envelope sender (Postfix: ${sender}, with null_sender=).")
@click.option("--recipient", required=True, help="The envelope recipient with its +token (${recipient}).")
@click.option("--sasl-user", default="", help="The SASL login of the submission (${sasl_username}).")
@click.option("--client", "client_address", default="", help="The client's IP address (${client_address}).")
@click.pass_obj
def reply_command(ctx: CliContext, sender: str, recipient: str, sasl_user: str, client_address: str) -> None:
    """Act on a reply to a digest, read on stdin (for a Postfix pipe transport). Exit 0 when decided
    (refused too), 75 when it must be tried again later."""
    raw = _read_stdin()
    logger = logging.getLogger("mailwarden")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    try:
        config = ctx.load()
    except SystemExit:
        sys.exit(EX_TEMPFAIL)  # bad config: keep the reply queued until it is fixed
    try:
        code = _handle(config, raw, sender, recipient, sasl_user, client_address)
    except Exception as exc:  # never a bounce for a bug either: the postmaster sees the deferred reply
        logging.getLogger("mailwarden.quarantine.digest.reply").exception("digest reply failed")
        click.echo(f"mailwarden: digest reply failed: {type(exc).__name__}", err=True)
        code = EX_TEMPFAIL
    sys.exit(code)


def _read_stdin() -> bytes:
    stream = sys.stdin.buffer
    data = stream.read(MAX_READ)
    while stream.read(1 << 20):
        pass
    return data


def _handle(config: Any, raw: bytes, sender: str, recipient: str, sasl_user: str, client_address: str) -> int:
    from mailwarden.decision import Action, Decision
    from mailwarden.logs import get_logger, log_kv, setup_logging
    from quarantine.digest.actions import Unavailable
    from quarantine.digest.outbox import Outbox
    from quarantine.digest.reply import DirectoryOwners, Envelope, ReplyHandler
    from quarantine.digest.tokens import Tokens
    from quarantine.store import QuarantineStore, StoreError

    decisions = setup_logging(config.section("logging"))
    started = time.monotonic()
    settings = config.section("quarantine")
    digest = settings.digest
    store = QuarantineStore(settings)
    owners = DirectoryOwners(config.section("policyd").recipients)
    teacher = _Teacher(config, store)
    try:
        with Outbox(settings) as outbox:
            handler = ReplyHandler(store, digest, Tokens(digest) if digest else None, owners, outbox, teacher)
            result = handler.handle(raw, Envelope(sender, recipient, sasl_user, client_address))
    except (Unavailable, StoreError) as exc:
        log_kv(get_logger("quarantine.digest.reply"), logging.WARNING,
               "digest reply deferred: tried again later", sender=sender, error=str(exc))
        click.echo(f"mailwarden: digest reply deferred: {exc}", err=True)
        decisions.emit(Decision("digest", "reply", "reply", Action.DEFER, "unavailable", time.monotonic() - started,
                                sender=sender, user=sasl_user, client=client_address).logfmt())
        return EX_TEMPFAIL
    finally:
        teacher.close()
        owners.close()
        store.close()
    action = Action.ACCEPT if result.decision == "answered" else Action.REJECT
    decisions.emit(Decision("digest", "reply", "reply", action, result.reason, time.monotonic() - started,
                            sender=sender, recipient=result.owner, user=sasl_user, client=client_address,
                            extra={"outcome": str(result.decision), "done": len(result.done),
                                   "refused": len(result.refused)}).logfmt())
    click.echo(f"{result.decision}: {len(result.done)} done, {len(result.refused)} refused")
    return 0


class _Teacher:
    """Bayes learning for the actions (milters/spam_learning.py through spamd, opened at first use)."""

    def __init__(self, config: Any, store: Any) -> None:
        self.config = config
        self.store = store
        self.client: Any = None

    def __call__(self, record: Any, kind: str) -> str:
        from milters.spam_learning import LEARNED_KINDS, learn_held
        from milters.spamd_client import SpamdClient

        if record.kind not in LEARNED_KINDS and str(record.state) not in ("delivered", "reported"):
            return ""
        settings = self.config.section("milters").spamassassin
        if self.client is None:
            self.client = SpamdClient(settings.spamd)
        if record.kind not in LEARNED_KINDS:
            record = _as_learnable(record)
        note: str = learn_held(self.client, settings, self.store, record, "ham" if kind == "ham" else "spam")
        return note

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def _as_learnable(record: Any) -> Any:
    import dataclasses

    return dataclasses.replace(record, kind="spam")


@digest_group.command("events")
@click.option("--since", metavar="WHEN", help="Only events since then: '2d' ago, or '2026-12-01[T08:00]' (UTC).")
@click.option("--limit", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the events as JSON.")
@click.pass_obj
def events_command(ctx: CliContext, since: str | None, limit: int, as_json: bool) -> None:
    """Refused replies to digests (forged or unauthenticated senders, tokens of another mailbox, tampered or
    expired, ids of someone else's message, virus-held), newest first, with counts by reason."""
    from quarantine.cli import open_store, parse_moment
    from quarantine.digest.subscribers import event_counts, events
    from quarantine.store import StoreError

    with open_store(ctx) as store:
        moment = parse_moment("--since", since, datetime.datetime.now(datetime.UTC))
        try:
            found = events(store, moment, limit)
            counts = event_counts(store)
        except StoreError as exc:
            fail(str(exc), EX_UNAVAILABLE)
    data = {"events": [event.as_dict() for event in found], "counts": counts}
    lines = [f"{event.at:%Y-%m-%d %H:%M:%S} {event.reason:<18} sender={event.sender or '-'} "
             f"owner={event.owner or '-'} login={event.sasl_user or '-'} client={event.client_address or '-'} "
             f"{event.detail}" for event in found if event.at is not None]
    summary = ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items())) or "none"
    emit(data, as_json, "\n".join([*lines, f"all time: {summary}"]) if lines else f"no events; all time: {summary}")
