"""End to end, bad input: the malformed MIME corpus and generated hostile messages sent through the real
Postfix into both milters chained (the ClamAV milter: banned attachments, then ClamAV; then the
SpamAssassin milter, with the real spamd), each followed by a clean marker.

What is shown, for every case: Postfix refused it itself, or a milter logged a decision for it (for an
accepted one, a decision line of each milter carrying the queue id of Postfix's 250 reply); and the marker
sent right after is accepted with decisions of its own (the milters still serve) and delivered. Over the
whole run each milter's peak resident set (VmHWM) stays bounded although one message is 50 MB, the
processes are alive and their logs have no traceback.
"""

from __future__ import annotations

import base64
import contextlib
import io
import re
import smtplib
import struct
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path

import pytest
from conftest import MilterStack, milter_settings
from harness.milter_proc import MilterProcess
from harness.net import wait_for

pytestmark = pytest.mark.e2e

CORPUS = Path(__file__).parent / "fixtures" / "banned" / "mime-tricky"
NOT_MAIL = re.compile(r"^(DEFECTS\.tsv|SOURCE\.md|LICENSE.*|NOTICE)$")
MB = 1 << 20
BIG = 50 * MB
PEAK_GROWTH_BOUND = 30 * MB
"""How much the milter's peak RSS may rise above what it was after its first messages. A spool that keeps
the 50 MB message in memory rises by at least 50 MB (measured: 57 MB with `spool_memory = "200MB"`, 5 MB
with the default 1 MB)."""
RCPT = "user@example.test"
POSTFIX_LIMITS = "message_size_limit = 60000000\n"
"""Room for the 50 MB body (Postfix's default is 10 MB); every other limit stays Postfix's default."""


@dataclass
class Outcome:
    name: str
    size: int
    reply: tuple[int, str]
    """Postfix's reply to the end of data, or to the command it refused."""
    decisions: list[str]
    """The milters' decision lines for this case's envelope sender (both logs)."""

    @property
    def queue_id(self) -> str:
        match = re.search(r"queued as ([0-9A-Za-z]+)", self.reply[1])
        return match.group(1) if match else ""

    def summary(self) -> str:
        actions = ",".join(sorted({m.group(1) for line in self.decisions
                                   if (m := re.search(r" action=(\S+)", line))})) or "none (Postfix refused it)"
        refusal = f" ({self.reply[1][:40]})" if self.reply[0] != 250 else ""
        return f"{self.name:<58} {self.size:>10} B  Postfix {self.reply[0]}{refusal}  milter {actions}"


def send_raw(stack: MilterStack, sender: str, data: bytes) -> tuple[int, str]:
    """One SMTP transaction; the reply that ended it (250 with the queue id, or the refusal)."""
    with stack.smtp() as conn:
        try:
            code, text = conn.mail(sender)
            if code != 250:
                return code, text.decode(errors="replace")
            code, text = conn.rcpt(RCPT)
            if code not in (250, 251):
                return code, text.decode(errors="replace")
            code, text = conn.data(data)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error.decode(errors="replace")
        except smtplib.SMTPServerDisconnected as exc:
            return 0, f"disconnected: {exc}"
        return code, text.decode(errors="replace")


def subject_of(data: bytes) -> str:
    """The Subject of a delivered message, from its header alone (the full parser recurses to death on
    some of the corpus)."""
    return str(BytesHeaderParser(policy=compat32).parsebytes(data, headersonly=True)["Subject"])


def decision_lines(log: str, sender: str) -> list[str]:
    return [line for line in log.splitlines() if "event=decision" in line and f" sender={sender} " in line]


def logs_once_decided(milters: Iterable[MilterProcess], sender: str, expected: int, timeout: float = 15.0) -> str:
    """The milters' logs joined, once ``expected`` decision lines for ``sender`` are in them (bounded: a
    shortfall is for the caller to report). Each milter writes its lines in order, so the lines of the
    message sent before ``sender``'s are in too: a positive signal, however late a line is written."""
    def joined() -> str:
        return "".join(m.log_text() for m in milters)

    with contextlib.suppress(TimeoutError):
        wait_for(lambda: len(decision_lines(joined(), sender)) >= expected, timeout,
                 what=f"{expected} decision lines for {sender}")
    return joined()


# --- the generated cases -----------------------------------------------------------------------------------

def head(subject: str, content_type: str = "text/plain", extra: bytes = b"") -> bytes:
    return (b"From: sender@example.org\r\nTo: user@example.test\r\nSubject: " + subject.encode() + b"\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: " + content_type.encode() + b"\r\n" + extra + b"\r\n")


def part(body: bytes, content_type: str = "text/plain", extra: bytes = b"") -> bytes:
    return b"Content-Type: " + content_type.encode() + b"\r\n" + extra + b"\r\n" + body + b"\r\n"


def attachment(name: str, data: bytes) -> bytes:
    return part(base64.encodebytes(data).replace(b"\n", b"\r\n"), "application/octet-stream",
                b"Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"" + name.encode()
                + b"\"\r\n")


def multipart(subject: str, *parts: bytes, boundary: str = "b1", close: bool = True) -> bytes:
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + p for p in parts)
    return head(subject, f"multipart/mixed; boundary=\"{boundary}\"") + body + (
        b"--" + boundary.encode() + b"--\r\n" if close else b"")


def deep_nesting(subject: str, depth: int) -> bytes:
    opening = b"".join(b"--n%d\r\nContent-Type: multipart/mixed; boundary=\"n%d\"\r\n\r\n" % (i, i + 1)
                       for i in range(1, depth))
    closing = b"".join(b"--n%d--\r\n" % i for i in range(depth, 0, -1))
    return (head(subject, "multipart/mixed; boundary=\"n1\"") + opening + b"--n%d\r\n" % depth
            + part(b"the innermost part") + closing)


def zip_of(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


def zeros_zip(name: str, size: int) -> bytes:
    """A zip whose one member inflates to ``size`` zero bytes, built without holding them."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = b"\x00" * MB
    data = b"".join(deflate.compress(zeros) for _ in range(size // MB)) + deflate.flush()
    crc = 0
    for _ in range(size // MB):
        crc = zlib.crc32(zeros, crc)
    raw = name.encode()
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(data), size, len(raw), 0)
    central = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, crc, len(data), size, len(raw),
                          0, 0, 0, 0, 0, 0)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central) + len(raw),
                      len(local) + len(raw) + len(data), 0)
    return local + raw + data + central + raw + end


def zip_bomb() -> bytes:
    """Three layers of ten copies around one member of 200 MB of zeros: 200 GB inflated, 8 KB on the wire
    (deflated zeros are repetitive enough to deflate again, as in 42.zip)."""
    inner = zeros_zip("zeros.bin", 200 * MB)
    for layer in ("c", "b", "a"):
        inner = zip_of({f"{layer}{i}.zip": inner for i in range(10)})
    return inner


def big_body(subject: str, size: int) -> bytes:
    """``size`` bytes of text, then a .exe attachment: the banned check must read to the end to refuse it, so
    the refusal shows the whole 50 MB went through the milter."""
    line = b"All work and no play makes Jack a dull boy. All work and no play makes Jack a dull boy.\r\n"
    text = line * (size // len(line))
    return multipart(subject, part(text), attachment("tail.exe", b"MZ\x90\x00" + b"\x00" * 60))


GENERATED: dict[str, Callable[[str], bytes]] = {
    "boundary never comes": lambda s: head(s, "multipart/mixed; boundary=\"nowhere\"") + b"text\r\n--elsewhere\r\n",
    "boundary never closed": lambda s: multipart(s, part(b"one"), attachment("a.txt", b"two"), close=False),
    "empty boundary": lambda s: head(s, "multipart/mixed; boundary=\"\"") + b"--\r\n" + part(b"x") + b"----\r\n",
    "boundary of 5000 characters": lambda s: multipart(s, part(b"x"), boundary="B" * 5000),
    "nested parts reuse the outer boundary": lambda s: multipart(
        s, part(b"--b1\r\nContent-Type: text/plain\r\n\r\ninner\r\n--b1--", "multipart/mixed; boundary=\"b1\"")),
    "boundary inside a base64 body": lambda s: multipart(
        s, part(b"aGVsbG8=\r\n--b1\r\nQUJD\r\n", "application/octet-stream",
                b"Content-Transfer-Encoding: base64\r\n")),
    "NUL bytes in the body": lambda s: head(s) + b"hello\x00world\r\n\x00\x00\x00\r\n" * 100,
    "NUL bytes in a header and the boundary": lambda s: (
        head(s, "multipart/mixed; boundary=\"a\x00b\"", b"X-Nul: one\x00two\r\n")
        + b"--a\x00b\r\n" + part(b"\x00") + b"--a\x00b--\r\n"),
    "NUL in an attachment name": lambda s: multipart(s, attachment("invoice.pdf\x00.exe", b"%PDF-1.4")),
    "8-bit headers, Latin-1 and UTF-8": lambda s: (
        head(s, extra="X-Latin: caf\xe9 cr\xe8me\r\nX-Utf8: Gr\u00fc\u00dfe \u65e5\u672c\r\n"
                      "Comments: \xff\xfe\xfd\r\n".encode("latin-1", "ignore")
             + "X-Utf8-Name: \u00e9t\u00e9\r\n".encode()) + b"body\r\n"),
    "8-bit attachment name": lambda s: multipart(
        s, part(b"x", "application/octet-stream",
                "Content-Disposition: attachment; filename=\"r\u00e9sum\u00e9.pdf\"\r\n".encode())),
    "1,000 nested multiparts": lambda s: deep_nesting(s, 1000),
    "1,001 sibling parts": lambda s: multipart(s, *(part(b"p%d" % i) for i in range(1001))),
    "a 2 MB header line": lambda s: head(s, extra=b"X-Long: " + b"y" * (2 * MB) + b"\r\n") + b"body\r\n",
    "a 2 MB body line without line ends": lambda s: head(s) + b"z" * (2 * MB) + b"\r\n",
    "10,000 Received lines": lambda s: head(s, extra=b"Received: from x by y; Mon, 1 Dec 2026\r\n" * 10000)
    + b"body\r\n",
    "base64 garbage as message/rfc822": lambda s: multipart(
        s, part(b"!!!!not base64@@@@\r\n" * 100, "message/rfc822", b"Content-Transfer-Encoding: base64\r\n")),
    "zip bomb, 200 GB inflated": lambda s: multipart(s, part(b"see attached"), attachment("bomb.zip", zip_bomb())),
    "zip with 5,000 members": lambda s: multipart(
        s, attachment("many.zip", zip_of({f"f{i}.txt": b"" for i in range(5000)}, zipfile.ZIP_STORED))),
    "truncated zip": lambda s: multipart(s, attachment("cut.zip", zip_of({"a.txt": b"a" * 3000})[:-30])),
    "a 50 MB body": lambda s: big_body(s, BIG),
}


BOUNDS_MET = {
    "1,000 nested multiparts": "depth>20",
    "1,001 sibling parts": "parts>1000",
    "zip bomb, 200 GB inflated": "archive 2/bomb.zip:a0.zip:b0.zip:c0.zip not opened: nested deeper than 2",
    "zip with 5,000 members": "archive 1/many.zip: members>1000",
}
"""Cases that meet a bound of the banned check (``[milters.banned]`` max_depth, max_parts,
max_archive_depth, max_archive_members): accepted (``on_limits = "accept"``), and the decision line says
what was not inspected."""


def corpus() -> Iterator[tuple[str, bytes]]:
    for path in sorted(CORPUS.rglob("*")):
        if path.is_file() and not NOT_MAIL.match(path.name):
            raw = path.read_bytes()
            yield str(path.relative_to(CORPUS)), re.sub(rb"\r?\n", b"\r\n", raw)


CHAIN = ("clamav", "spamassassin")


def test_hostile_input_gets_a_decision_in_bounded_memory_and_the_milters_keep_serving(milter_stack, clamd, spamd):
    settings = milter_settings(clamd)
    settings["milters"]["spamassassin"] = {"spamd": {"address": spamd.tcp_address}, "reject_level": 1000}
    stack: MilterStack = milter_stack(settings, postfix_main_cf=POSTFIX_LIMITS, milters=CHAIN)
    milters = stack.milters.values()
    for i in range(3):  # warm up every code path of a normal message before the baseline is taken
        assert send_raw(stack, f"warmup-{i}@example.org", head(f"warm-up {i}") + b"hello\r\n")[0] == 250
    baseline = {m.name: m.status("VmHWM") for m in milters}
    threads = {m.name: m.status("Threads") for m in milters}

    cases: list[tuple[str, Callable[[], bytes]]] = [(f"corpus {name}", lambda raw=raw: raw)
                                                    for name, raw in corpus()]
    cases += [(f"generated {name}", lambda build=build, name=name: build(name))
              for name, build in GENERATED.items()]
    outcomes: list[Outcome] = []
    problems: list[str] = []
    markers: list[str] = []
    accepted = 3
    started = time.monotonic()
    for n, (name, build) in enumerate(cases):
        data = build()
        sender = f"hostile-{n}@example.org"
        reply = send_raw(stack, sender, data)
        marker_sender, marker = f"marker-{n}@example.org", f"marker after case {n}"
        marker_reply = send_raw(stack, marker_sender, head(marker) + b"clean\r\n")
        log = logs_once_decided(milters, marker_sender, len(CHAIN) if marker_reply[0] == 250 else 0)
        outcome = Outcome(name, len(data), reply, decision_lines(log, sender))
        outcomes.append(outcome)
        del data
        if reply[0] == 250:
            held = any(" action=quarantine " in line for line in outcome.decisions)
            accepted += 0 if held else 1  # a held message is committed to the store, not delivered
            deciders = {m.group(1) for line in outcome.decisions if f"queue_id={outcome.queue_id} " in line
                        and (m := re.search(r" milter=(\S+)", line))}
            if deciders != set(CHAIN):
                problems.append(f"{name}: accepted as {outcome.queue_id} with decisions from {sorted(deciders)} only")
        elif not outcome.decisions and not 500 <= reply[0] < 600:
            # 5xx without a decision: Postfix refused it before the milter (size, hop count); the client
            # bounces it. A 4xx without one is Postfix's milter_default_action: the milter failed
            problems.append(f"{name}: refused {reply} with no milter decision")
        marker_outcome = Outcome(marker, 0, marker_reply, decision_lines(log, marker_sender))
        if marker_reply[0] != 250 or len(marker_outcome.decisions) != len(CHAIN):
            problems.append(f"{name}: the marker after it got {marker_reply}, decisions {marker_outcome.decisions}")
        else:
            accepted += 1
            markers.append(marker)
    sent_seconds = time.monotonic() - started

    stack.sink.wait_for(accepted, timeout=60)
    arrived = {subject_of(m.data) for m in stack.sink.messages}
    problems += [f"{marker}: accepted, never delivered" for marker in markers if marker not in arrived]

    peak = {m.name: m.status("VmHWM") for m in milters}
    print(f"\n{len(outcomes)} cases in {sent_seconds:.1f} s; Postfix's reply and the milters' actions per case:")
    for outcome in outcomes:
        print("  " + outcome.summary())
    for m in milters:
        print(f"{m.name} milter peak RSS (VmHWM): {peak[m.name] / MB:.1f} MB, {baseline[m.name] / MB:.1f} MB after "
              f"the warm-up; threads {threads[m.name]} then {m.status('Threads')}")
    assert not problems, "\n".join(problems)
    for m in milters:
        log = m.log_text()
        assert m.proc is not None and m.proc.poll() is None, f"the {m.name} milter died"
        assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]
        assert peak[m.name] - baseline[m.name] < PEAK_GROWTH_BOUND, (
            f"{m.name} milter peak RSS {peak[m.name] / MB:.1f} MB, {(peak[m.name] - baseline[m.name]) / MB:.1f} MB "
            f"above the {baseline[m.name] / MB:.1f} MB after the warm-up (bound {PEAK_GROWTH_BOUND / MB:.0f} MB)")
    by_name = {o.name.removeprefix("generated "): o for o in outcomes}
    for name, skipped in BOUNDS_MET.items():
        assert any(f"not inspected: {skipped}" in line for line in by_name[name].decisions), (
            f"{name}: the decision line does not say what the banned check left uninspected", by_name[name])
    big = by_name["a 50 MB body"]
    assert big.reply[0] == 554 and any("rule=extension:exe" in line for line in big.decisions), (
        "the 50 MB message was not read to its end", big)

