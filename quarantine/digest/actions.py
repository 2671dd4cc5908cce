"""What an accepted reply does to the owner's held mail: one function per verb, each done at most once.

The reply handler (``reply.py``) has already checked the sender, verified the token and found the row
among the owner's own; here each verb is carried out with the store's conditional state transitions, so a
replayed reply (byte for byte, or with a new Message-ID) changes nothing more and says "already done":

- ``RELEASE``: ``release.release`` (held -> releasing -> released, re-injected once), then Bayes learns it
  as ham for the owner when ``learn_on_release``;
- ``DELETE``: held -> deleted, then Bayes learns it as spam when ``learn_on_delete`` (not a virus);
- ``WHITELIST``: the sender on the owner's white list, then ``RELEASE``;
- ``BLOCK``: the sender on the owner's black list (its address, or its domain when ``block_domain`` says
  so: ``auto`` when the address looks single-use, ``single_use``), then ``DELETE``;
- ``REPORT``: a row the SpamAssassin milter recorded as delivered (state ``delivered``) -> ``reported``,
  learnt as spam when ``learn_on_delete``;
- ``PREVIEW``: the sanitised text of the message (``preview.py``), no change;
- of a virus-held message (``release.ADMIN_ONLY_KINDS``) only ``DELETE`` and ``BLOCK``
  (``USER_ACTIONS_ON_ADMIN_ONLY``; the handler refuses the rest as ``admin-only``);
- ``RELEASE ALL``: ``RELEASE`` of every row of the owner still held, except the kinds only an admin
  releases (``release.ADMIN_ONLY_KINDS``);
- ``DIGEST DAILY|WEEKLY|IMMEDIATE|OFF``: the owner's interval (``subscribers.set_interval``).

Each result is one line in plain words for the confirmation (no rule names, no scores). The store or the
re-injection listener unavailable raises ``Unavailable``: the reply is tried again later (Postfix keeps it).
"""

from __future__ import annotations

import email.utils
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass

from quarantine.digest.preview import clean, defang, preview
from quarantine.digest.settings import BlockDomain, DigestSettings, Interval
from quarantine.digest.subscribers import set_interval
from quarantine.digest.tokens import Action
from quarantine.models import State
from quarantine.preferences import SpamPreferences, split_sender
from quarantine.release import ADMIN_ONLY_KINDS, Failure, ReleaseError, release
from quarantine.store import HeldRecord, QuarantineStore, StoreError, UnknownMessage

USER_ACTIONS_ON_ADMIN_ONLY = frozenset({Action.DELETE, Action.BLOCK})
"""What the owner may do to a message of a kind only an admin releases (a virus): harmless, nothing of it
reaches the user. RELEASE, WHITELIST and PREVIEW of it are refused (``admin-only``); the digest offers
only these buttons for it."""
MAX_RELEASE_ALL = 500
"""Rows one ``RELEASE ALL`` releases at most (the rest: another RELEASE ALL)."""

Teach = Callable[[HeldRecord, str], str]
"""(the row, "ham" | "spam") -> a note ("" when nothing was taught); never raises."""

INTERVALS = {Action.DIGEST_DAILY: Interval.DAILY, Action.DIGEST_WEEKLY: Interval.WEEKLY,
             Action.DIGEST_IMMEDIATE: Interval.IMMEDIATE, Action.DIGEST_OFF: Interval.OFF}


class Unavailable(Exception):
    """The store or the re-injection listener cannot be used now: try the reply again later."""


@dataclass(frozen=True)
class Outcome:
    done: bool
    """True: carried out now; False: refused or done before (``text`` says which)."""
    text: str
    """One line for the confirmation, in plain words."""
    preview: str = ""
    """PREVIEW's sanitised text."""


# -- single-use senders ----------------------------------------------------------------------------------

_BATV = re.compile(r"^(prvs|msprvs\d?|btv\d?)=", re.IGNORECASE)
_SRS = re.compile(r"^srs[01][=+-]", re.IGNORECASE)
_VERP = re.compile(r"[-+.][^=]*=[a-z0-9-]+(\.[a-z0-9-]+)+$", re.IGNORECASE)
"""``bounce-123-foo=bar.com``: the recipient's address encoded in the local part (``=`` for its ``@``)."""


def single_use(address: str) -> bool:
    """Whether a sender address looks made for one message: VERP (``bounce-123-foo=bar.com@``), BATV
    (``prvs=0123abcd=user@``), SRS, or a local part with a long random-looking run of letters and digits
    (``bounces+7a3f9c2e1b4d@``, ``0102018c5e9a7f3b-4d1e@``)."""
    parts = split_sender(address)
    if parts is None:
        return False
    local = parts[0]
    if _BATV.match(local) or _SRS.match(local) or _VERP.search(local):
        return True
    for run in re.split(r"[-_.+=]", local):
        digits = sum(char.isdigit() for char in run)
        if len(run) >= 10 and digits == len(run):
            return True  # a long number: a message or campaign id
        changes = sum(1 for one, two in itertools.pairwise(run) if one.isdigit() != two.isdigit())
        if len(run) >= 12 and digits >= 3 and changes >= 4:
            return True
    return len(local) > 40


def block_pattern(address: str, policy: BlockDomain) -> str:
    """What ``BLOCK`` puts on the black list for ``address``: the address, or its domain."""
    parts = split_sender(address)
    if parts is None:
        raise ValueError(f"{address!r} is not an address")
    local, domain = parts
    if policy is BlockDomain.ALWAYS or (policy is BlockDomain.AUTO and single_use(address)):
        return domain
    return f"{local}@{domain}"


def sender_of(record: HeldRecord) -> str:
    """The address a white or black list entry names: the header From (what the user saw), else the
    envelope sender; "" when neither is an address."""
    _, header = email.utils.parseaddr(record.header_from)
    for candidate in (header, record.sender):
        if candidate and split_sender(candidate) is not None:
            return candidate.lower()
    return ""


def describe(record: HeldRecord) -> str:
    """The message as the confirmation names it: subject and sender, sanitised and defanged."""
    subject = defang(clean(record.subject or "(no subject)", 80))
    sender = defang(clean(sender_of(record) or record.sender or "(no sender)", 80))
    return f'"{subject}" from {sender}'


# -- the verbs -------------------------------------------------------------------------------------------


class Actions:
    """The verbs for one owner: ``by`` is recorded as who changed each row."""

    def __init__(self, store: QuarantineStore, settings: DigestSettings, preferences: SpamPreferences,
                 teach: Teach, owner: str, by: str) -> None:
        self.store = store
        self.settings = settings
        self.preferences = preferences
        self.teach = teach
        self.owner = owner
        self.by = by

    def run(self, action: Action, record: HeldRecord) -> Outcome:
        """A message action on the owner's row ``record``; raises Unavailable."""
        verbs = {Action.RELEASE: self.release, Action.DELETE: self.delete, Action.WHITELIST: self.whitelist,
                 Action.BLOCK: self.block, Action.REPORT: self.report, Action.PREVIEW: self.preview}
        verb = verbs.get(action)
        if verb is None:
            raise ValueError(f"{action} is not a message action")
        try:
            return verb(record)
        except StoreError as exc:
            raise Unavailable(str(exc)) from None

    def release(self, record: HeldRecord) -> Outcome:
        what = describe(record)
        try:
            release(self.store, record.public_id, self.by)
        except ReleaseError as exc:
            if exc.failure in (Failure.SEND, Failure.STORE, Failure.OUTCOME_UNKNOWN):
                if exc.failure is Failure.OUTCOME_UNKNOWN:
                    return Outcome(False, f"Release of {what}: it was sent but not confirmed; it stays "
                                          "in the quarantine until the administrators check it.")
                raise Unavailable(str(exc)) from None
            return Outcome(False, self._not_held(record, "released"))
        if self.settings.learn_on_release:
            self.teach(record, "ham")
        return Outcome(True, f"Released: {what}. It is on its way to {clean(record.recipient, 80)}.")

    def delete(self, record: HeldRecord) -> Outcome:
        what = describe(record)
        if not self.store.transition(record.public_id, [State.HELD], State.DELETED, self.by):
            return Outcome(False, self._not_held(record, "deleted"))
        if self.settings.learn_on_delete and record.kind.lower() not in ADMIN_ONLY_KINDS:
            self.teach(record, "spam")  # a virus says nothing about what spam looks like to this user
        return Outcome(True, f"Deleted: {what}.")

    def whitelist(self, record: HeldRecord) -> Outcome:
        sender = sender_of(record)
        if not sender:
            return Outcome(False, f"Not added to your safe senders: {describe(record)} has no sender address.")
        added = self.preferences.add_sender(self.owner, sender, "white", self.by)
        listed = f"{defang(clean(sender, 80))} is {'now' if added else 'already'} on your list of safe senders"
        released = self.release(record)
        return Outcome(added or released.done, f"{listed}. {released.text}")

    def block(self, record: HeldRecord) -> Outcome:
        sender = sender_of(record)
        if not sender:
            return Outcome(False, f"Not blocked: {describe(record)} has no sender address.")
        pattern = block_pattern(sender, self.settings.block_domain)
        added = self.preferences.add_sender(self.owner, pattern, "black", self.by)
        whom = f"everything from {defang(pattern)}" if "@" not in pattern else defang(pattern)
        listed = f"{whom} is {'now' if added else 'already'} blocked for you"
        deleted = self.delete(record)
        return Outcome(added or deleted.done, f"{listed[0].upper()}{listed[1:]}. {deleted.text}")

    def report(self, record: HeldRecord) -> Outcome:
        what = describe(record)
        if not self.store.transition(record.public_id, [State.DELIVERED], State.REPORTED, self.by):
            now = self.store.get(record.public_id)
            if now is not None and now.state is State.REPORTED:
                return Outcome(False, f"Already reported: {what}.")
            return Outcome(False, f"Not reported: {what} is not among the delivered mail of your digest "
                                  "(use DELETE for held mail).")
        if self.settings.learn_on_delete:
            self.teach(record, "spam")
        return Outcome(True, f"Reported as spam: {what}. Thank you: the filter learns from it.")

    def preview(self, record: HeldRecord) -> Outcome:
        what = describe(record)
        try:
            text = preview(self.store.raw(record.public_id)).render()
        except UnknownMessage:
            return Outcome(False, f"No preview of {what}: it is no longer kept.")
        return Outcome(True, f"Preview of {what} below.", preview=text)

    def release_all(self) -> list[Outcome]:
        """RELEASE of every held row of the owner an owner may release."""
        try:
            rows = self.store.find(mailbox=self.owner, state=State.HELD, limit=MAX_RELEASE_ALL)
        except StoreError as exc:
            raise Unavailable(str(exc)) from None
        outcomes = [self.release(row) for row in rows if row.kind.lower() not in ADMIN_ONLY_KINDS]
        skipped = sum(row.kind.lower() in ADMIN_ONLY_KINDS for row in rows)
        if skipped:
            outcomes.append(Outcome(False, f"{skipped} message(s) held because of a virus stay in the quarantine: "
                                           "only the mail administrators can release them."))
        if not rows:
            outcomes.append(Outcome(False, "Release all: nothing of yours is held now."))
        return outcomes

    def interval(self, action: Action) -> Outcome:
        interval = INTERVALS[action]
        try:
            changed = set_interval(self.store, self.owner, interval, self.by)
        except StoreError as exc:
            raise Unavailable(str(exc)) from None
        text = {Interval.DAILY: "once a day", Interval.WEEKLY: "once a week",
                Interval.IMMEDIATE: "soon after mail is held", Interval.OFF: "no more digests"}[interval]
        return Outcome(changed, f"Digests: {text}" + ("." if changed else " (that was already your choice)."))

    def _not_held(self, record: HeldRecord, verb: str) -> str:
        now = self.store.get(record.public_id)
        what = describe(record)
        if now is None:
            return f"Not {verb}: {what} is no longer in the quarantine."
        when = f" on {now.state_at:%Y-%m-%d %H:%M} UTC"
        if now.state in (State.RELEASED, State.RELEASING):
            return f"Already released{when}: {what}."
        if now.state == State.DELETED:
            return f"Already deleted{when}: {what}."
        if now.state == State.EXPIRED:
            return f"Not {verb}: {what} was kept as long as the quarantine keeps mail, and is gone."
        return f"Not {verb}: {what} is not held."
