"""The ClamAV check against a real clamd (tests/harness/clamd.py: a private one with the local test
signatures only), through its unix socket and over TCP: what each answer of clamd becomes, what happens
when clamd is away, hung or restarted, and messages larger than the scanner's limit."""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import socket
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import Milter
import pytest
from harness.clamd import FIXTURES, ClamdInstance
from harness.milter_ctx import RecordingCtx, drive_milter
from prometheus_client import REGISTRY
from pydantic import ValidationError

from mailwarden.logs import DecisionLog
from milters import clamd_client
from milters.base import MilterApp
from milters.check import Message
from milters.clamav import VERSION_REFRESH, ClamavCheck, ClamavSettings, Finding, classify
from milters.spool import Spool
from milters.verdict import REJECT_VIRUS, TEMPFAIL_SCANNER, Fate, Verdict

EICAR = base64.b64decode("WDVPIVAlQEFQWzRcUFpYNTQoUF4pN0NDKTd9JEVJQ0FSLVNUQU5EQVJELUFOVElWSVJVUy1URVNULUZJTEUhJEgrSCo=")
"""The 68-byte EICAR test string, kept encoded so that no file of the source tree is flagged."""
EICAR_NAME = "Local.Eicar.Test."
"""What the local test signatures report for it (HDB or NDB, with .UNOFFICIAL appended): match the prefix."""


# --- messages -----------------------------------------------------------------------------------------

def mime(subject: str, body: str = "Hello,\n\nplease find the file attached.\n") -> EmailMessage:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = "Sender <sender@example.org>"
    msg["To"] = "user@example.test"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject.replace(' ', '.')}@example.org>"
    msg.set_content(body)
    return msg


def raw_headers(subject: str) -> bytes:
    return (f"From: sender@example.org\r\nTo: user@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@example.org>\r\n").encode()


def eicar_plain() -> bytes:
    """EICAR as the text of a single-part message."""
    return raw_headers("plain") + b"\r\n" + EICAR + b"\r\n"


def eicar_attached() -> bytes:
    msg = mime("attached")
    msg.add_attachment(EICAR, maintype="application", subtype="octet-stream", filename="eicar.com")
    return msg.as_bytes()


def eicar_zip() -> bytes:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("eicar.com", EICAR)
    msg = mime("zip")
    msg.add_attachment(archive.getvalue(), maintype="application", subtype="zip", filename="invoice.zip")
    return msg.as_bytes()


def eicar_quoted_printable() -> bytes:
    """Every byte encoded (=58=35=4F...), so only a scanner that decodes quoted-printable sees it."""
    encoded = "".join(f"={byte:02X}" for byte in EICAR)
    lines = [encoded[i:i + 72] + "=" for i in range(0, len(encoded), 72)]
    return (raw_headers("quoted-printable") + b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + "\r\n".join(lines).encode() + b"\r\n")


def text_lines(size: int) -> str:
    line = "All work and no play makes Jack a dull boy, but this text is perfectly harmless.\n"
    return line * (size // len(line) + 1)


def eicar_after_text() -> bytes:
    """1.5 MB of text first, then the attachment."""
    msg = mime("long letter", text_lines(1_500_000))
    msg.add_attachment(EICAR, maintype="application", subtype="octet-stream", filename="eicar.com")
    data = msg.as_bytes()
    assert len(data) > 1_500_000
    return data


def clean_message() -> bytes:
    msg = mime("minutes", "The minutes of Tuesday's meeting.\n")
    msg.add_attachment(b"%PDF-1.4 harmless\n", maintype="application", subtype="pdf", filename="minutes.pdf")
    return msg.as_bytes()


def clean_text(size: int) -> bytes:
    return raw_headers("big") + b"\r\n" + text_lines(size).replace("\n", "\r\n").encode()


def attachment(name: str, data: bytes, subtype: str = "octet-stream") -> bytes:
    msg = mime(name)
    msg.add_attachment(data, maintype="application", subtype=subtype, filename=name)
    return msg.as_bytes()


def message(raw: bytes, auth_user: str = "") -> Message:
    spool = Spool(memory_limit=256 * 1024)
    spool.write(raw)
    return Message(queue_id="4ABC123DEF", client_address="192.0.2.10", client_name="client.example",
                   helo="client.example", sender="sender@example.org", recipients=["user@example.test"],
                   auth_user=auth_user, spool=spool)


def header(verdict: Verdict, name: str, held: bool = False) -> str | None:
    headers = verdict.held_headers if held else verdict.headers
    return next((value for key, value in headers if key == name), None)


def scanner_errors() -> float:
    return REGISTRY.get_sample_value("mailwarden_milter_scanner_errors_total", {"check": "clamav"}) or 0.0


# --- fixtures -----------------------------------------------------------------------------------------

@pytest.fixture(params=["unix", "tcp"])
def address(request: pytest.FixtureRequest, clamd: ClamdInstance) -> str:
    """The private clamd's address as the ``clamd`` setting says it: its unix socket, then its TCP port."""
    return clamd.unix_address if request.param == "unix" else clamd.tcp_address


@pytest.fixture
def make_check() -> Iterator[Callable[..., ClamavCheck]]:
    made: list[ClamavCheck] = []

    def make(clamd: str, sleep: Callable[[float], None] | None = None, now: Callable[[], float] | None = None,
             **settings: object) -> ClamavCheck:
        extra: dict = {"sleep": sleep} if sleep else {}
        if now:
            extra["now"] = now
        check = ClamavCheck(ClamavSettings(clamd=clamd, **settings), **extra)
        made.append(check)
        return check

    yield make
    for check in made:
        check.close()


@pytest.fixture(scope="module")
def small_clamd() -> Iterator[ClamdInstance]:
    """clamd with StreamMaxLength 64K: a message above it must be cut, not sent whole."""
    with ClamdInstance(stream_max_length="64K") as instance:
        yield instance


@pytest.fixture(scope="module")
def alerting_clamd() -> Iterator[ClamdInstance]:
    """clamd that reports encrypted archives (Heuristics.Encrypted.Zip) and files above 20K
    (Heuristics.Limits.Exceeded.MaxFileSize, with AlertExceedsMax)."""
    with ClamdInstance(options={"AlertEncrypted": "yes", "AlertExceedsMax": "yes", "MaxFileSize": "20K"}) as instance:
        yield instance


# --- classification ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "finding"), [
    ("Heuristics.Phishing.Email.SpoofedDomain", Finding.HEURISTIC),
    ("Heuristics.Encrypted.Zip", Finding.HEURISTIC),
    ("PUA.Win.Packer.Upx", Finding.HEURISTIC),
    ("Heuristics.Limits.Exceeded.MaxFileSize", Finding.LIMITS),
    ("Heuristics.Limits.Exceeded.MaxScanSize", Finding.LIMITS),
    ("Heuristics.Limits.Exceeded", Finding.LIMITS),
    ("Win.Test.EICAR_HDB-1", Finding.VIRUS),
    ("Local.Eicar.Test.NDB.UNOFFICIAL", Finding.VIRUS),
    ("Doc.Dropper.Agent-1234567", Finding.VIRUS),
    ("HeuristicsNotReally.Trojan", Finding.VIRUS),
])
def test_classify_names_clamd_reports(name, finding):
    assert classify(name) is finding


# --- settings -----------------------------------------------------------------------------------------

def test_settings_defaults():
    settings = ClamavSettings()
    assert settings.listen == "inet:127.0.0.1:10030"
    assert settings.checks == ["banned", "clamav"]
    assert settings.clamd == "unix:/run/clamav/clamd.ctl"
    assert settings.stream_max_length == 25 * 1024 * 1024
    assert (settings.virus, settings.heuristic, settings.limits) == ("reject", "tag", "tag")
    assert (settings.on_error_inbound, settings.on_error_submission) == ("tempfail", "accept")
    assert settings.timeout == 600  # libmilter's, distinct from the scan's
    assert settings.scan_timeout == 30


@pytest.mark.parametrize("bad", [{"clamd": "/run/clamav/clamd.ctl"}, {"clamd": "inet:[::1]:3310"},
                                 {"clamd": "inet:127.0.0.1:70000"}, {"clamd": "tcp:127.0.0.1:3310"},
                                 {"virus": "drop"}, {"on_error_inbound": "reject"}, {"stream_max_length": "10"},
                                 {"scan_timeout": "soon"}, {"unknown": 1}])
def test_settings_refuse_bad_values(bad):
    with pytest.raises(ValidationError):
        ClamavSettings(**bad)


def test_settings_read_human_units():
    settings = ClamavSettings(stream_max_length="64KB", scan_timeout="500ms", clamd="inet:clamd.example.org:3310")
    assert (settings.stream_max_length, settings.scan_timeout) == (65536, 0.5)


# --- real clamd: findings -------------------------------------------------------------------------------

@pytest.mark.parametrize("build", [eicar_plain, eicar_attached, eicar_zip, eicar_quoted_printable, eicar_after_text],
                         ids=["plain", "base64-attachment", "zip", "quoted-printable", "after-1.5MB-text"])
def test_virus_is_rejected_with_the_name_in_the_reason_only(address, make_check, build):
    verdict = make_check(address).check(message(build()))
    assert verdict.fate is Fate.REJECT
    assert verdict.kind == "virus"
    assert verdict.check == "clamav"
    assert verdict.reason.startswith(EICAR_NAME)
    assert verdict.reply == REJECT_VIRUS
    assert "Eicar" not in verdict.reply.text and verdict.reply.code.startswith("5")
    assert header(verdict, "X-Virus-Status", held=True) == f"Infected ({verdict.reason})"
    assert header(verdict, "X-Virus-Status") == "Infected"  # delivered copies (tag/accept) never name it


def test_clean_message_gets_clean_headers(address, make_check, clamd):
    verdict = make_check(address).check(message(clean_message()))
    assert verdict.fate is Fate.ACCEPT
    assert verdict.kind == ""
    assert header(verdict, "X-Virus-Status") == "Clean"
    version = clamd.command("VERSION")  # "ClamAV 1.4.6" (a database version and date follow with a CVD)
    assert header(verdict, "X-Virus-Scanned") == f"{version} via mailwarden"
    assert version.startswith("ClamAV 1.")


@pytest.mark.parametrize(("fate", "expected"), [("tag", Fate.TAG), ("accept", Fate.ACCEPT),
                                                ("quarantine", Fate.QUARANTINE)])
def test_virus_fate_follows_the_setting(clamd, make_check, fate, expected):
    verdict = make_check(clamd.unix_address, virus=fate).check(message(eicar_attached()))
    assert verdict.fate is expected
    assert verdict.kind == "virus"
    assert header(verdict, "X-Virus-Status") == "Infected"
    assert header(verdict, "X-Virus-Scanned", held=True)
    assert header(verdict, "X-Virus-Status", held=True).startswith(f"Infected ({EICAR_NAME}")


def test_encrypted_zip_is_a_heuristic_with_its_own_fate(alerting_clamd, make_check):
    raw = attachment("report.zip", (FIXTURES / "encrypted.zip").read_bytes(), "zip")
    tagged = make_check(alerting_clamd.tcp_address).check(message(raw))
    assert (tagged.fate, tagged.kind, tagged.reason) == (Fate.TAG, "heuristic", "Heuristics.Encrypted.Zip")
    assert header(tagged, "X-Virus-Status") == "Infected (heuristic)"
    held = make_check(alerting_clamd.unix_address, heuristic="quarantine").check(message(raw))
    assert (held.fate, held.kind) == (Fate.QUARANTINE, "heuristic")
    assert header(held, "X-Virus-Status", held=True) == "Infected (Heuristics.Encrypted.Zip)"
    rejected = make_check(alerting_clamd.unix_address, heuristic="reject").check(message(raw))
    assert (rejected.fate, rejected.reply) == (Fate.REJECT, REJECT_VIRUS)


def test_clamds_limits_heuristic_is_limits_never_clean(alerting_clamd, make_check):
    raw = attachment("data.bin", bytes(range(256)) * 200)  # 51 KB, above MaxFileSize 20K
    verdict = make_check(alerting_clamd.unix_address).check(message(raw))
    assert (verdict.fate, verdict.kind) == (Fate.TAG, "limits")
    assert verdict.reason.startswith("Heuristics.Limits.Exceeded.")
    assert header(verdict, "X-Virus-Status") == "Unscanned (scan limits exceeded)"
    rejected = make_check(alerting_clamd.unix_address, limits="reject").check(message(raw))
    assert rejected.fate is Fate.REJECT


# --- messages larger than the scanner's limit ----------------------------------------------------------------

@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_larger_than_stream_max_length_is_scanned_in_part_and_tagged_unscanned(small_clamd, make_check, transport):
    address = small_clamd.unix_address if transport == "unix" else small_clamd.tcp_address
    check = make_check(address, stream_max_length="64KB", pass_descriptor=False)
    verdict = check.check(message(clean_text(300_000)))
    assert (verdict.fate, verdict.kind) == (Fate.TAG, "limits")
    assert verdict.reason == "larger than the scanner's limit; first 65536 bytes scanned"
    assert header(verdict, "X-Virus-Status") == "Unscanned (larger than the scanner's limit)"
    assert header(verdict, "X-Virus-Scanned")


def test_virus_in_the_scanned_part_of_a_large_message_is_a_virus(small_clamd, make_check):
    raw = raw_headers("virus first") + b"\r\n" + EICAR + b"\r\n" + text_lines(300_000).encode()
    verdict = make_check(small_clamd.tcp_address, stream_max_length="64KB").check(message(raw))
    assert (verdict.fate, verdict.kind) == (Fate.REJECT, "virus")
    assert verdict.reason.startswith(EICAR_NAME)


def test_a_spooled_message_is_handed_to_a_local_clamd_whole(small_clamd, make_check):
    """clamd on a unix socket and the message on disk (above the spool's memory): the file itself goes to
    clamd (FILDES), so a virus beyond stream_max_length is found; over TCP the same message is cut."""
    raw = clean_text(300_000) + EICAR + b"\r\n"
    local = make_check(small_clamd.unix_address, stream_max_length="64KB").check(message(raw))
    assert (local.fate, local.kind) == (Fate.REJECT, "virus") and local.reason.startswith(EICAR_NAME)
    streamed = make_check(small_clamd.tcp_address, stream_max_length="64KB").check(message(raw))
    assert streamed.kind == "limits"
    in_memory = Spool(memory_limit=1 << 20)
    in_memory.write(raw)
    small = Message(queue_id="", client_address="", client_name="", helo="", sender="", recipients=["u@x"],
                    auth_user="", spool=in_memory)
    assert make_check(small_clamd.unix_address, stream_max_length="64KB").check(small).kind == "limits"


def test_virus_beyond_the_limit_is_limits_not_clean(small_clamd, make_check):
    raw = clean_text(300_000) + EICAR + b"\r\n"
    verdict = make_check(small_clamd.tcp_address, stream_max_length="64KB", limits="quarantine").check(message(raw))
    assert (verdict.fate, verdict.kind) == (Fate.QUARANTINE, "limits")
    assert header(verdict, "X-Virus-Status", held=True).startswith("Unscanned (larger than the scanner's limit")


def test_stream_max_length_above_clamds_never_passes_the_message(small_clamd, make_check):
    """A misconfiguration (ours 1MB, clamd's 64K): clamd cuts the stream; the message is not clean. (A file
    handed over with FILDES is not a stream: pass_descriptor is off here to stream over the unix socket.)"""
    for address in (small_clamd.unix_address, small_clamd.tcp_address):
        verdict = make_check(address, stream_max_length="1MB", pass_descriptor=False, sleep=lambda _pause: None).check(
            message(clean_text(300_000)))
        assert verdict.kind in ("unscanned", "limits"), verdict
        assert verdict.fate in (Fate.TEMPFAIL, Fate.TAG)
        assert header(verdict, "X-Virus-Status") != "Clean"


# --- clamd away, hung, restarted ---------------------------------------------------------------------------

@pytest.mark.parametrize(("auth_user", "settings", "fate", "status"), [
    ("", {}, Fate.TEMPFAIL, None),
    ("alice", {}, Fate.ACCEPT, "Unscanned (scanner unavailable)"),
    ("", {"on_error_inbound": "accept"}, Fate.ACCEPT, "Unscanned (scanner unavailable)"),
    ("alice", {"on_error_submission": "tempfail"}, Fate.TEMPFAIL, None),
], ids=["inbound", "submission", "inbound-accept", "submission-tempfail"])
def test_clamd_stopped_gives_the_fail_mode_after_one_retry(address, make_check, clamd, caplog, auth_user, settings,
                                                           fate, status):
    clamd.stop()
    pauses: list[float] = []
    errors_before = scanner_errors()
    check = make_check(address, sleep=pauses.append, retry_pause="2s", **settings)
    with caplog.at_level(logging.WARNING, logger="mailwarden"):
        verdict = check.check(message(eicar_attached(), auth_user=auth_user))
    assert (verdict.fate, verdict.kind) == (fate, "unscanned")
    assert pauses == [2.0]
    assert scanner_errors() - errors_before == 2  # both attempts counted
    if fate is Fate.TEMPFAIL:
        assert verdict.reply == TEMPFAIL_SCANNER
        assert not verdict.headers
    else:
        assert verdict.headers == (("X-Virus-Status", status),)  # no X-Virus-Scanned: nothing was scanned
    warnings = [r for r in caplog.records if r.getMessage() == "clamd scan failed"]
    assert warnings and warnings[0].kv["clamd"] == address and warnings[0].kv["error"]


@pytest.mark.parametrize(("size", "scan_timeout", "per_mb"), [(2_000, 0.3, 0.0), (3 * (1 << 20), 0.2, 0.25)],
                         ids=["small", "3MB-scaled"])
def test_clamd_paused_times_out_within_the_scaled_timeout(address, make_check, clamd, size, scan_timeout, per_mb):
    clamd.pause()
    check = make_check(address, scan_timeout=scan_timeout, timeout_per_mb=per_mb, retry_pause="100ms")
    raw = clean_text(size)
    budget = scan_timeout + per_mb * len(raw) / (1 << 20)
    started = time.monotonic()
    inbound = check.check(message(raw))
    elapsed = time.monotonic() - started
    assert (inbound.fate, inbound.kind, inbound.reply) == (Fate.TEMPFAIL, "unscanned", TEMPFAIL_SCANNER)
    assert 2 * budget + 0.1 - 0.05 <= elapsed < 2 * budget + 0.1 + 1.0
    submission = check.check(message(raw, auth_user="alice"))
    assert (submission.fate, header(submission, "X-Virus-Status")) == (Fate.ACCEPT, "Unscanned (scanner unavailable)")
    clamd.resume()
    assert header(check.check(message(raw)), "X-Virus-Status") == "Clean"  # and back once clamd answers


def test_retry_reaches_clamd_that_came_back_during_the_pause(address, make_check, clamd):
    """clamd restarting (or reloading) when the message arrives: the one retry after the pause scans it."""
    clamd.stop()

    def pause(_seconds: float) -> None:
        clamd.start()

    verdict = make_check(address, sleep=pause).check(message(eicar_zip()))
    assert (verdict.fate, verdict.kind) == (Fate.REJECT, "virus")


def test_clamd_restarted_between_two_messages(address, make_check, clamd):
    check = make_check(address, sleep=lambda _pause: pytest.fail("no retry expected"))
    assert header(check.check(message(clean_message())), "X-Virus-Status") == "Clean"
    pid = clamd.proc.pid
    clamd.restart()
    assert clamd.proc.pid != pid
    assert check.check(message(eicar_plain())).kind == "virus"


def test_clamd_reloading_its_signatures_keeps_answering(make_check, clamd):
    check = make_check(clamd.unix_address, sleep=lambda _pause: None)
    clamd.command("RELOAD")
    assert check.check(message(eicar_attached())).kind == "virus"
    clamd.reload()
    assert check.check(message(clean_message())).fate is Fate.ACCEPT


def test_concurrent_checks_each_get_their_own_answer(address, make_check):
    """libmilter calls check from several worker threads at once: no answer may cross to another message."""
    check = make_check(address)
    builds = [eicar_plain, clean_message, eicar_zip, clean_message, eicar_attached, clean_message] * 4
    results: dict[int, Verdict] = {}

    def run(index: int) -> None:
        results[index] = check.check(message(builds[index]()))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(builds))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for index, build in enumerate(builds):
        assert results[index].kind == ("" if build is clean_message else "virus"), (index, results[index])


def test_version_is_cached_and_refreshed(make_check, clamd, monkeypatch):
    asked: list[str] = []
    original = clamd_client.command

    def command(address, name: str, timeout: float) -> str:
        asked.append(name)
        return original(address, name, timeout)

    monkeypatch.setattr(clamd_client, "command", command)
    clock = [1000.0]
    check = make_check(clamd.unix_address, now=lambda: clock[0])
    for _ in range(5):
        assert header(check.check(message(clean_message())), "X-Virus-Scanned").startswith("ClamAV 1.")
    assert len(asked) == 1
    clock[0] += VERSION_REFRESH + 1
    check.check(message(clean_message()))
    assert len(asked) == 2


# --- clamd answers that are no answer -------------------------------------------------------------------------

class FakeClamd:
    """A unix socket that answers each INSTREAM with ``reply`` (or closes without a word), and VERSION."""

    def __init__(self, path: Path, reply: bytes) -> None:
        self.path, self.reply = path, reply
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                data = conn.recv(65536)
                if data.startswith(b"nVERSION\n"):
                    conn.sendall(b"ClamAV 0.0.0-fake\n")
                    continue
                while not data.endswith(b"\0\0\0\0") and (chunk := conn.recv(65536)):
                    data += chunk
                conn.sendall(self.reply)

    def close(self) -> None:
        """Wake the accept (shutdown) before closing: a thread left blocked in accept on a closed socket
        outlives the test, and its descriptor's number goes to the next socket opened."""
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the fake clamd's thread did not end"


@pytest.mark.parametrize("reply", [b"stream: Can't allocate memory ERROR\n", b"", b"what is this\n",
                                   b"stream: FOUND\n"],
                         ids=["error", "no-answer", "garbage", "found-without-name"])
def test_a_reply_that_is_no_verdict_is_a_failure(tmp_path, make_check, reply):
    fake = FakeClamd(tmp_path / "fake.sock", reply)
    try:
        pauses: list[float] = []
        check = make_check(f"unix:{fake.path}", sleep=pauses.append)
        inbound = check.check(message(clean_message()))
        assert (inbound.fate, inbound.kind) == (Fate.TEMPFAIL, "unscanned")
        assert len(pauses) == 1
        submission = check.check(message(clean_message(), auth_user="alice"))
        assert header(submission, "X-Virus-Status") == "Unscanned (scanner unavailable)"
    finally:
        fake.close()


def test_clamd_refusing_the_stream_as_too_long_is_limits_unscanned(tmp_path, make_check, caplog):
    """clamd's own StreamMaxLength below ours, when its refusal arrives (its "size limit exceeded" refusal): limits,
    nothing scanned (no X-Virus-Scanned), and the log says which setting to lower."""
    fake = FakeClamd(tmp_path / "fake.sock", b"INSTREAM size limit exceeded. ERROR\n")
    try:
        with caplog.at_level(logging.WARNING, logger="mailwarden"):
            verdict = make_check(f"unix:{fake.path}").check(message(clean_message()))
        assert (verdict.fate, verdict.kind) == (Fate.TAG, "limits")
        assert verdict.headers == (("X-Virus-Status", "Unscanned (larger than the scanner's limit)"),)
        assert any("StreamMaxLength" in r.getMessage() for r in caplog.records)
    finally:
        fake.close()


# --- inside the milter base ---------------------------------------------------------------------------------

def through_milter(check: ClamavCheck, raw: bytes, monkeypatch: pytest.MonkeyPatch,
                   auth: str | None = None) -> tuple[int, RecordingCtx, str]:
    """The check in MessageMilter, driven by pymilter's TestCtx (as test_milter_base does): the answer, the
    context (its ``_msg`` is the message as delivered, ``_reply`` the SMTP reply) and the decision lines."""
    out = io.StringIO()
    rc, ctx = drive_milter(MilterApp("clamav", [check], DecisionLog(stream=out)), monkeypatch, raw, auth=auth)
    return rc, ctx, out.getvalue()


def test_in_the_milter_a_virus_is_rejected_generically_and_logged_by_name(clamd, make_check, monkeypatch):
    rc, ctx, decisions = through_milter(make_check(clamd.unix_address), eicar_zip(), monkeypatch)
    assert rc == Milter.REJECT
    assert ctx._reply[:2] == ("554", "5.7.1") and "Eicar" not in " ".join(ctx._reply)
    assert f"reason={EICAR_NAME}" in decisions and "action=reject" in decisions


def test_in_the_milter_forged_verdict_headers_are_replaced_by_ours(clamd, make_check, monkeypatch):
    forgery = b"X-Virus-Status: Clean\r\nX-Virus-Scanned: by nobody\r\n"
    forged = eicar_attached().replace(b"Subject:", forgery + b"Subject:", 1)
    rc, ctx, _ = through_milter(make_check(clamd.tcp_address, virus="tag"), forged, monkeypatch)
    assert rc == Milter.ACCEPT
    assert ctx._msg.get_all("X-Virus-Status") == ["Infected"]
    assert ctx._msg["X-Virus-Scanned"].startswith("ClamAV 1.")


def test_in_the_milter_clamd_down_tempfails_inbound_and_tags_submission(clamd, make_check, monkeypatch):
    clamd.stop()
    check = make_check(clamd.unix_address, sleep=lambda _pause: None)
    rc, ctx, _ = through_milter(check, clean_message(), monkeypatch)
    assert rc == Milter.TEMPFAIL and ctx._reply[:2] == ("451", "4.7.1")
    rc, ctx, _ = through_milter(check, clean_message(), monkeypatch, auth="alice")
    assert rc == Milter.ACCEPT
    assert ctx._msg["X-Virus-Status"] == "Unscanned (scanner unavailable)"
