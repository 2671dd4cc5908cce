"""End to end: smtplib -> a real private Postfix -> smtpd_milters -> our ClamAV milter (its own process) ->
a real private clamd with the local test signatures; Postfix relays what it accepts to the sink.

Faults are shown with a second Postfix in front (the "sending MTA"): it queues what ours tempfails and
retries every second or two, so "nothing lost" means the message reaches the sink once the fault is gone.
The stack itself (fixture ``milter_stack``) is in conftest.py, shared with the other test_e2e_milter_* files.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from email.message import EmailMessage
from pathlib import Path

import pytest
from conftest import mailwarden, milter_settings, text_message

pytestmark = pytest.mark.e2e

from test_clamav import EICAR  # noqa: E402  (kept encoded there, so no file of the tree is flagged)


def with_attachment(subject: str, data: bytes, filename: str, maintype: str = "application",
                    subtype: str = "octet-stream", body: str = "see attached\n") -> EmailMessage:
    msg = text_message(subject, body)
    msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg


def zipped(name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return out.getvalue()


def eicar_forwarded(subject: str) -> EmailMessage:
    inner = with_attachment("the original", EICAR, "eicar.txt")
    outer = text_message(subject, "forwarding this\n")
    outer.add_attachment(inner)  # message/rfc822
    return outer


def eicar_quoted_printable(subject: str) -> bytes:
    qp = EICAR.decode().replace("=", "=3D")
    return (f"From: sender@example.org\r\nTo: user@example.test\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
            f"{qp}\r\n").encode()


def eicar_after_text(subject: str, text_bytes: int = 1_500_000) -> EmailMessage:
    line = "All work and no play makes Jack a dull boy. " * 2 + "\n"
    return with_attachment(subject, EICAR, "eicar.txt", body=line * (text_bytes // len(line) + 1))


@pytest.mark.parametrize("build", [
    lambda s: with_attachment(s, EICAR, "eicar.txt"),
    lambda s: with_attachment(s, zipped("eicar.txt", EICAR), "eicar.zip", subtype="zip"),
    eicar_forwarded,
    eicar_quoted_printable,
    eicar_after_text,
], ids=["attachment", "zip", "forwarded-rfc822", "quoted-printable", "after-1.5MB-of-text"])
def test_eicar_is_refused_at_end_of_data_and_never_delivered(milter_stack, build):
    stack = milter_stack()
    subject = "infected"
    refused = stack.send(build(subject))
    assert refused is not None, "an infected message was accepted"
    code, text = refused
    assert code == 554 and text.startswith("5.7.1")
    assert "eicar" not in text.lower() and "local" not in text.lower(), "the signature name reached the client"
    stack.marker()
    assert stack.sink.with_subject(subject) == []
    log = stack.milter.wait_log("action=reject")
    assert "check=clamav" in log and "Eicar" in log and "queue_id=" in log


def test_clean_message_arrives_marked_clean_and_a_forged_status_is_removed(milter_stack):
    stack = milter_stack()
    msg = text_message("clean one")
    msg["X-Virus-Status"] = "Clean (forged by the sender)"
    assert stack.send(msg) is None
    stack.sink.wait_for_subjects("clean one")
    [arrived] = stack.sink.with_subject("clean one")
    assert arrived.message.get_all("X-Virus-Status") == ["Clean"]
    assert "ClamAV" in arrived.message["X-Virus-Scanned"]
    stack.milter.wait_log("action=accept")


def test_clamd_down_tempfails_inbound_and_the_sending_mta_delivers_it_once_clamd_is_back(milter_stack):
    stack = milter_stack(front=True)
    stack.clamd.stop()
    assert stack.front is not None
    stack.send_via_front(text_message("while clamd was down"))
    stack.milter.wait_log("action=defer", timeout=30)
    assert "while clamd was down" not in {m.message["Subject"] for m in stack.sink.messages}
    stack.clamd.start()
    stack.front.flush()  # the sending MTA retries now rather than after its backoff
    stack.sink.wait_for_subjects("while clamd was down", timeout=60)
    [arrived] = stack.sink.with_subject("while clamd was down")
    assert arrived.message["X-Virus-Status"] == "Clean"
    stack.marker()
    assert len(stack.sink.with_subject("while clamd was down")) == 1


def test_clamd_down_lets_authenticated_submission_through_marked_unscanned(milter_stack):
    stack = milter_stack()
    stack.clamd.stop()
    assert stack.send(text_message("from alice"), login="alice") is None
    stack.sink.wait_for_subjects("from alice")
    [arrived] = stack.sink.with_subject("from alice")
    assert arrived.message["X-Virus-Status"].startswith("Unscanned")


def test_inbound_with_clamd_down_is_refused_451(milter_stack):
    stack = milter_stack()
    stack.clamd.stop()
    refused = stack.send(text_message("inbound while down"))
    assert refused is not None and refused[0] == 451


def test_a_milter_killed_mid_message_costs_nothing(milter_stack, clamd):
    """Postfix's milter_default_action = tempfail: the sending MTA keeps the message and delivers it once
    the milter is back."""
    settings = {**milter_settings(clamd), "logging": {"level": "debug"}}
    stack = milter_stack(settings, front=True)
    assert stack.front is not None
    stack.clamd.pause()  # the scan hangs: the milter is inside end of message when it is killed
    stack.send_via_front(text_message("killed mid-way"))
    stack.milter.wait_log('msg="end of message"', timeout=30)
    stack.milter.kill()
    stack.clamd.resume()
    stack.milter.start()
    stack.front.flush()
    stack.sink.wait_for_subjects("killed mid-way", timeout=60)
    [arrived] = stack.sink.with_subject("killed mid-way")
    assert arrived.message["X-Virus-Status"] == "Clean"
    stack.marker()
    assert len(stack.sink.with_subject("killed mid-way")) == 1


def test_sigterm_stops_the_milter_cleanly(milter_stack):
    stack = milter_stack()
    assert stack.send(text_message("before the stop")) is None
    stack.sink.wait_for_subjects("before the stop")
    stack.milter.stop()
    assert stack.milter.proc is not None and stack.milter.proc.returncode == 0
    assert "msg=stopping" in stack.milter.log_text()


def test_quarantined_virus_is_committed_not_delivered_and_released_to_one_recipient_once(milter_stack, clamd):
    stack = milter_stack(milter_settings(clamd, virus="quarantine"))
    subject = "held virus"
    assert stack.send(with_attachment(subject, EICAR, "eicar.txt"),
                      rcpts=("alice@example.test", "bob@example.test")) is None  # accepted: then discarded
    log = stack.milter.wait_log("action=quarantine")
    assert "held_id=" in log and "kind=virus" in log
    stack.marker()
    assert stack.sink.with_subject(subject) == []

    listed = json.loads(mailwarden(stack.milter, "quarantine", "list", "--json").stdout)
    rows = listed if isinstance(listed, list) else listed["messages"]
    held = {row["recipient"]: row for row in rows}
    assert set(held) == {"alice@example.test", "bob@example.test"}
    assert all(row["kind"] == "virus" and row["state"] == "held" and "Eicar" in row["reason"] for row in rows)

    refused = subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(stack.milter.config_path),
                              "quarantine", "release", held["alice@example.test"]["public_id"]],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1, "a virus was released without --admin"
    mailwarden(stack.milter, "quarantine", "release", "--admin", held["alice@example.test"]["public_id"])
    stack.sink.wait_for_subjects(subject, timeout=30)
    [released] = stack.sink.with_subject(subject)
    assert released.rcpt_tos == ("alice@example.test",)
    assert released.mail_from == "sender@example.org"
    assert released.message["X-Virus-Status"].startswith("Infected"), "the held copy names what it holds"

    again = subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(stack.milter.config_path),
                            "quarantine", "release", "--admin", held["alice@example.test"]["public_id"]],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1
    stack.marker("after the releases")
    assert len(stack.sink.with_subject(subject)) == 1
    state = json.loads(mailwarden(stack.milter, "quarantine", "show", "--json",
                                  held["bob@example.test"]["public_id"]).stdout)
    assert (state.get("state") or state["message"]["state"]) == "held"


def rfc2231_split(subject: str) -> bytes:
    return (f"From: sender@example.org\r\nTo: user@example.test\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/mixed; boundary=b1\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
            "--b1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
            "Content-Disposition: attachment; filename*0=\"invoice.pd\"; filename*1=\"f.ex\"; filename*2=\"e\"\r\n\r\n"
            "aGVsbG8=\r\n--b1--\r\n").encode()


@pytest.mark.parametrize(("name", "build"), [
    ("double extension", lambda s: with_attachment(s, b"%PDF-1.4 not really", "invoice.pdf.exe")),
    ("rfc2231 split", rfc2231_split),
    ("rfc2047 encoded", lambda s: with_attachment(s, b"data", "=?UTF-8?B?SU5WT0lDRS5QREYuRVhF?=")),
    ("right-to-left override", lambda s: with_attachment(s, b"data", "report\u202eexe.pdf")),
])
def test_banned_attachments_are_refused_with_a_generic_reply(milter_stack, name, build):
    stack = milter_stack()
    refused = stack.send(build(name))
    assert refused is not None, f"{name}: accepted"
    code, text = refused
    assert code == 554 and "exe" not in text.lower() and "rule" not in text.lower()
    log = stack.milter.wait_log("check=banned action=reject")
    assert "rule=" in log
    stack.marker()
    assert stack.sink.with_subject(name) == []


def test_a_clean_pdf_passes_the_banned_check(milter_stack):
    stack = milter_stack()
    assert stack.send(with_attachment("a real pdf", b"%PDF-1.4\n%...\n", "report.pdf", subtype="pdf")) is None
    stack.sink.wait_for_subjects("a real pdf")


def test_a_milter_on_a_unix_socket_serves_postfix(milter_stack, clamd):
    """Postfix runs as user postfix: the socket's mode (socket_mode) must let it connect."""
    directory = Path(tempfile.mkdtemp(prefix="mw-milter-sock-"))
    directory.chmod(0o755)
    settings = milter_settings(clamd, socket_mode="0666")
    stack = milter_stack(settings, unix_socket=directory / "clamav.sock")
    assert oct((directory / "clamav.sock").stat().st_mode & 0o777) == "0o666"
    assert stack.send(text_message("over a unix socket")) is None
    stack.sink.wait_for_subjects("over a unix socket")
    shutil.rmtree(directory, ignore_errors=True)


def test_held_mail_is_filed_under_the_mailbox_the_recipient_sources_name(milter_stack, clamd, tmp_path):
    """An alias's and a +extension's held mail is its mailbox's (the owner lists it as their own); a list
    alias with several mailboxes keeps its own address."""
    recipients = tmp_path / "recipients.map"
    recipients.write_text("carol@example.test\nsales@example.test: carol@example.test\n"
                          "team@example.test: carol@example.test, dave@example.test\n")
    settings = milter_settings(clamd, virus="quarantine")
    settings["policyd"] = {"recipients": {"sources": ["file"], "file": {"paths": [str(recipients)]}}}
    stack = milter_stack(settings)
    rcpts = ("sales@example.test", "carol+news@example.test", "team@example.test", "erin@example.test")
    assert stack.send(with_attachment("held for the mailbox", EICAR, "eicar.txt"), rcpts=rcpts) is None
    stack.milter.wait_log("action=quarantine")

    rows = json.loads(mailwarden(stack.milter, "quarantine", "list", "--json").stdout)
    mailbox_of = {row["recipient"]: row["mailbox"] for row in (rows if isinstance(rows, list) else rows["messages"])}
    assert mailbox_of == {"sales@example.test": "carol@example.test", "carol+news@example.test": "carol@example.test",
                          "team@example.test": "team@example.test", "erin@example.test": "erin@example.test"}
    carols = json.loads(mailwarden(stack.milter, "quarantine", "list", "--mailbox", "carol@example.test",
                                   "--json").stdout)
    assert len(carols if isinstance(carols, list) else carols["messages"]) == 2
