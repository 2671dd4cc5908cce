"""Per-recipient verdicts: what a milter check decides, and how the decisions of several checks for several
recipients become one answer to Postfix.

A check returns one Verdict for the whole message or one per recipient (the SpamAssassin milter's
per-user thresholds). At end of message the verdicts of every check are merged per recipient (the
strongest wins, ``SEVERITY``) and the message-level answer follows (``resolve``):

- every recipient rejected: the message is rejected (one reply for all: SMTP has no per-recipient answer
  after DATA);
- any recipient tempfailed (a scanner or the store could not answer): the whole message is tempfailed,
  so the sender retries and nothing is lost or delivered half-scanned;
- otherwise the rejected and quarantined recipients are held (committed to the store first), removed
  with ``delrcpt``, and the message goes on to the others; when nobody is left it is discarded, after
  the store has committed it.

A delivered recipient whose verdict says ``record`` (the SpamAssassin milter's tagged mail) is also
recorded in the store, as delivered (``Resolution.recorded``): best effort, never at the cost of the
message (milters/base.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum


class Fate(StrEnum):
    ACCEPT = "accept"
    TAG = "tag"
    QUARANTINE = "quarantine"
    TEMPFAIL = "tempfail"
    REJECT = "reject"


SEVERITY = {Fate.ACCEPT: 0, Fate.TAG: 1, Fate.QUARANTINE: 2, Fate.TEMPFAIL: 3, Fate.REJECT: 4}
"""Which verdict wins for one recipient when checks disagree: a rejection stands whatever else is found;
a failed scan beats a hold (the retry scans it whole); a hold beats tagging."""


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply Postfix gives the client at end of data. The text is for outsiders: generic, never a
    rule, a score or a signature name."""

    code: str
    status: str
    text: str


REJECT_VIRUS = Reply("554", "5.7.1", "Message content rejected")
REJECT_CONTENT = Reply("554", "5.7.1", "Message content rejected")
REJECT_SPAM = Reply("550", "5.7.1", "Message content rejected")
TEMPFAIL_SCANNER = Reply("451", "4.7.1", "Message content could not be checked, try again later")
TEMPFAIL_STORE = Reply("451", "4.3.0", "Temporary local problem, try again later")


@dataclass(frozen=True, slots=True)
class Verdict:
    fate: Fate
    check: str
    """The check that decided: ``clamav``, ``banned`` ..."""
    reason: str
    """Why, for the log and the quarantine record (signature name, part and rule): never sent to the
    client."""
    kind: str = ""
    """The class of the finding, kept in the quarantine record and labelled in metrics: ``virus``,
    ``heuristic``, ``banned``, ``unscanned``, ``spam`` ..."""
    headers: tuple[tuple[str, str], ...] = ()
    """Added to the message when it is delivered to a recipient with this verdict (X-Virus-Status ...)."""
    held_headers: tuple[tuple[str, str], ...] = ()
    """Added only to the quarantined copy (the signature name), never to delivered mail."""
    reply: Reply | None = None
    """The answer for REJECT and TEMPFAIL; a generic one when unset."""
    subject_tag: str = ""
    """Put in front of the Subject of the delivered copy, when every delivered recipient's verdict asks
    for the same tag (a visible change nobody gets unasked)."""
    log_fields: tuple[tuple[str, str], ...] = ()
    """Added to the recipient's decision line (the spam score ...)."""
    record: bool = False
    """For a delivered recipient (ACCEPT, TAG): keep a record of the message in the quarantine store, in
    state ``delivered`` with this verdict's check, kind and reason (tagged spam, for the digest's REPORT).
    Best effort: a store that cannot keep it costs the record, never the message."""

    @property
    def severity(self) -> int:
        return SEVERITY[self.fate]


CheckResult = Verdict | Mapping[str, Verdict]
"""One verdict for every recipient, or one per recipient (keyed by the recipient as Postfix gave it)."""


def for_recipient(result: CheckResult, recipient: str) -> Verdict | None:
    if isinstance(result, Verdict):
        return result
    return result.get(recipient)


def merge(current: Verdict | None, new: Verdict | None) -> Verdict | None:
    """The stronger of two verdicts for one recipient (on a tie the later one, so a clean message's line
    says what the last check found: "clean" rather than banned's "no banned attachment"; but a later verdict
    without a ``kind`` does not hide an earlier one with a finding, so a message banned could inspect only
    in part says so rather than "clean"), carrying the headers of both: a message that passes every check
    carries each check's headers."""
    if new is None:
        return current
    if current is None:
        return new
    later_wins = new.severity > current.severity or (new.severity == current.severity
                                                     and (bool(new.kind) or not current.kind))
    winner, other = (new, current) if later_wins else (current, new)
    headers = winner.headers + tuple(h for h in other.headers if h not in winner.headers)
    held = winner.held_headers + tuple(h for h in other.held_headers if h not in winner.held_headers)
    fields = winner.log_fields + tuple(f for f in other.log_fields if f not in winner.log_fields)
    tag = winner.subject_tag or other.subject_tag
    if (headers, held, fields, tag) == (winner.headers, winner.held_headers, winner.log_fields, winner.subject_tag):
        return winner
    return replace(winner, headers=headers, held_headers=held, log_fields=fields, subject_tag=tag)


@dataclass
class Resolution:
    """What the milter does at end of message."""

    fate: Fate
    """REJECT or TEMPFAIL (the whole message), QUARANTINE (every recipient held: discard once committed),
    or ACCEPT (deliver to ``delivered``, hold ``held``)."""
    reply: Reply | None = None
    held: dict[str, Verdict] = field(default_factory=dict)
    delivered: dict[str, Verdict | None] = field(default_factory=dict)
    recorded: dict[str, Verdict] = field(default_factory=dict)
    """The delivered recipients whose verdict asks for a record (``Verdict.record``)."""
    headers: list[tuple[str, str]] = field(default_factory=list)
    """Added to the delivered copy: the union of the delivered recipients' verdicts' headers, in order."""
    subject_tag: str = ""
    """Put in front of the delivered copy's Subject: the tag every delivered recipient's verdict asks for."""


def resolve(recipients: Sequence[str], verdicts: Mapping[str, Verdict | None]) -> Resolution:
    """The message-level answer for the merged per-recipient verdicts (see the module docstring)."""
    final = [verdicts.get(rcpt) for rcpt in recipients]
    decided = [v for v in final if v is not None]
    if recipients and len(decided) == len(recipients) and all(v.fate is Fate.REJECT for v in decided):
        return Resolution(Fate.REJECT, decided[0].reply or REJECT_CONTENT)
    failed = next((v for v in decided if v.fate is Fate.TEMPFAIL), None)
    if failed is not None:
        return Resolution(Fate.TEMPFAIL, failed.reply or TEMPFAIL_SCANNER)
    resolution = Resolution(Fate.ACCEPT)
    for rcpt, verdict in zip(recipients, final, strict=True):
        if verdict is not None and verdict.fate in (Fate.REJECT, Fate.QUARANTINE):
            resolution.held[rcpt] = verdict
        else:
            resolution.delivered[rcpt] = verdict
            if verdict is not None and verdict.record:
                resolution.recorded[rcpt] = verdict
    if not resolution.delivered:
        resolution.fate = Fate.QUARANTINE
    for verdict in resolution.delivered.values():
        for header in verdict.headers if verdict else ():
            if header not in resolution.headers:
                resolution.headers.append(header)
    tags = {verdict.subject_tag if verdict else "" for verdict in resolution.delivered.values()}
    if len(tags) == 1:
        resolution.subject_tag = tags.pop()
    return resolution
