"""The banned-attachments check (milters/banned.py) on generated messages, hostile input and the
mime-tricky corpus: pure logic, no milter, no Postfix.

Each attack case is built here, byte by byte where the trick is in the bytes, so that the test says
what it proves; the corpus (tests/fixtures/banned/mime-tricky) is real mail software's tricky input.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import random
import re
import struct
import threading
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import pytest

from mailwarden.config import ConfigError
from milters import banned as banned_module
from milters.banned import BannedCheck, BannedSettings, detect, name_rule, normalise_name, shown
from milters.check import Message
from milters.mime_walk import BASE64_BLOCKS, CHUNK, Limits, _Decoder, walk
from milters.spool import Spool
from milters.verdict import REJECT_CONTENT, Fate

CORPUS = Path(__file__).parent / "fixtures" / "banned" / "mime-tricky"
SHIPPED = Path(__file__).resolve().parents[1] / "rules" / "banned.toml"

PE = (b"MZ\x90\x00" + b"\x00" * 56 + struct.pack("<L", 0xC0) + b"\x0e\x1f\xba\x0e\x00\xb4\x09\xcd\x21"
      + b"This program cannot be run in DOS mode.\r\r\n$").ljust(0xC0, b"\x00") + b"PE\x00\x00\x4c\x01" + b"\x00" * 200
"""The start of a Windows executable: MZ header, DOS stub, PE signature at e_lfanew."""
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n%%EOF\n"


# -- building messages ----------------------------------------------------------------------------


def b64(data: bytes) -> bytes:
    encoded = base64.b64encode(data)
    return b"\r\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76)) + b"\r\n"


def part(body: bytes, content_type: str = "application/octet-stream", disposition: str | None = None,
         encoding: str = "base64", extra: str = "") -> bytes:
    """One MIME part; ``body`` is encoded as ``encoding`` says (base64, or sent as is)."""
    head = f"Content-Type: {content_type}\r\n"
    if disposition is not None:
        head += f"Content-Disposition: {disposition}\r\n"
    head += f"Content-Transfer-Encoding: {encoding}\r\n{extra}"
    payload = b64(body) if encoding == "base64" else body
    return head.encode("utf-8") + b"\r\n" + payload


def multipart(*parts: bytes, boundary: str = "=-=b=-=", subtype: str = "mixed", close: bool = True) -> bytes:
    out = f"Content-Type: multipart/{subtype}; boundary=\"{boundary}\"\r\n\r\nThis is MIME.\r\n".encode()
    for each in parts:
        out += f"--{boundary}\r\n".encode() + each + b"\r\n"
    if close:
        out += f"--{boundary}--\r\n".encode()
    return out


def mail(body_entity: bytes, subject: str = "test") -> bytes:
    return (f"Received: from x by y; Tue, 1 Dec 2026 10:00:00 +0000\r\nFrom: a@example.org\r\n"
            f"To: b@example.net\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n").encode() + body_entity


def text(content: str = "Hello,\r\nsee attached.\r\n") -> bytes:
    return part(content.encode(), "text/plain; charset=utf-8", encoding="7bit")


def attach(name: str, body: bytes, content_type: str = "application/octet-stream") -> bytes:
    return part(body, content_type, f'attachment; filename="{name}"')


def zip_bytes(members: dict[str, bytes], encrypted: bool = False) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    out = bytearray(buffer.getvalue())
    if encrypted:  # zipfile cannot encrypt: set the flag, which is all a lister sees (names stay readable)
        for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            at = out.find(signature)
            while at >= 0:
                out[at + flags_at] |= 0x1
                at = out.find(signature, at + 4)
    return bytes(out)


def as_message(raw: bytes | Spool) -> Message:
    spool = raw if isinstance(raw, Spool) else Spool()
    if not isinstance(raw, Spool):
        spool.write(raw)
    return Message(queue_id="4ABC123", client_address="192.0.2.7", client_name="mx.example.org",
                   helo="mx.example.org", sender="a@example.org", recipients=["b@example.net"], auth_user="",
                   spool=spool)


@pytest.fixture
def check() -> BannedCheck:
    return BannedCheck(BannedSettings(files=[SHIPPED]))


def verdict_of(check: BannedCheck, raw: bytes | Spool):
    return check.check(as_message(raw))


# -- what is caught, and what is not ---------------------------------------------------------------

CAUGHT = {
    "double extension": (mail(multipart(text(), attach("invoice.pdf.exe", PE))),
                         '2', 'invoice.pdf.exe', "double-extension:pdf.exe"),
    "double extension padded with spaces": (mail(multipart(text(), attach("invoice.pdf          .scr", b"x"))),
                                            "2", None, "double-extension:pdf.scr"),
    "plain extension, upper case": (mail(multipart(text(), attach("SETUP.EXE", b"x"))), "2", "SETUP.EXE",
                                    "extension:exe"),
    "trailing dots and spaces": (mail(multipart(text(), attach("run.bat. . ", b"x"))), "2", None,
                                 "extension:bat"),
    "RFC 2231 continuations with a charset": (
        mail(multipart(text(), part(b"x", "application/octet-stream",
                                    "attachment;\r\n filename*0*=UTF-8''r%C3%A9sum%C3%A9.p;\r\n"
                                    " filename*1*=df.e;\r\n filename*2=\"xe\""))),
        "2", "résumé.pdf.exe", "double-extension:pdf.exe"),
    "RFC 2047 base64 word, upper case": (
        mail(multipart(text(), attach("=?UTF-8?B?SU5WT0lDRS5QREYuRVhF?=", b"x"))),
        "2", "INVOICE.PDF.EXE", "double-extension:pdf.exe"),
    "RFC 2047 Q word in Latin-1": (
        mail(multipart(text(), part(b"x", 'application/octet-stream; name="=?iso-8859-1?Q?r=E9sum=E9=2Epdf=2Ejs?="',
                                    "attachment"))),
        "2", "résumé.pdf.js", "double-extension:pdf.js"),
    "a broken encoded word before a good one": (
        mail(multipart(text(), attach("=?UTF-8?B?!?= =?UTF-8?B?SU5WT0lDRS5FWEU=?=", b"x"))),
        "2", None, "extension:exe"),
    "right-to-left override": (
        mail(multipart(text(), part(b"x", "application/octet-stream",
                                    "attachment; filename*=UTF-8''report%E2%80%AEexe.pdf"))),
        "2", "report\u202eexe.pdf", "bidi-override"),
    "right-to-left override in raw UTF-8 (RFC 6532)": (
        mail(multipart(text(), attach("photo\u202egnp.scr", b"x"))), "2", None, "bidi-override"),
    "zero-width space inside the extension": (mail(multipart(text(), attach("tool.e\u200bxe", b"x"))), "2", None,
                                              "extension:exe"),
    "fullwidth letters": (mail(multipart(text(), attach("tool\uff0e\uff45\uff58\uff45", b"x"))), "2", None,
                          "extension:exe"),
    "NUL inside the name": (
        mail(multipart(text(), part(b"x", "application/octet-stream",
                                    "attachment; filename*=UTF-8''tool.exe%00.pdf"))),
        "2", None, "extension:exe"),
    "name only in Content-Type": (mail(multipart(text(), part(b"x", 'application/octet-stream; name="a.vbs"'))),
                                  "2", "a.vbs", "extension:vbs"),
    "path in the name": (mail(multipart(text(), attach("C:\\Users\\x\\Desktop\\run.cmd", b"x"))), "2", None,
                         "extension:cmd"),
    "a second Content-Disposition": (
        mail(multipart(text(), part(b"x", "application/octet-stream", 'inline; filename="x.txt"',
                                    extra='Content-Disposition: attachment; filename="x.exe"\r\n'))),
        "2", "x.exe", "extension:exe"),
    "fifty other Content-* fields first": (
        mail(multipart(text(), part(b"x", extra="".join(f"Content-X-{i}: y\r\n" for i in range(50))
                                    + 'Content-Disposition: attachment; filename="y.exe"\r\n'))),
        "2", "y.exe", "extension:exe"),
    "a 2 MB header line before the name": (
        mail(multipart(text(), part(b"x", extra="X-Big: " + "b" * (2 << 20) + "\r\n"
                                    + 'Content-Disposition: attachment; filename="big.exe"\r\n'))),
        "2", "big.exe", "extension:exe"),
    "filename twice, the RFC 2231 one banned": (
        mail(multipart(text(), part(b"x", "application/octet-stream",
                                    "attachment; filename=\"a.txt\"; filename*=UTF-8''a%2Eexe"))),
        "2", "a.exe", "extension:exe"),
    "filename twice, the second banned": (
        mail(multipart(text(), part(b"x", "application/octet-stream",
                                    'attachment; filename="a.txt"; filename="b.scr"'))),
        "2", "b.scr", "extension:scr"),
    "white space before the colon": (
        mail(multipart(text(), b"Content-Type : application/octet-stream\r\n"
                               b"Content-Disposition\t: attachment; filename=\"c.exe\"\r\n\r\nx\r\n")),
        "2", "c.exe", "extension:exe"),
    "filename and name disagree": (
        mail(multipart(text(), part(b"x", 'application/octet-stream; name="z.exe"', 'attachment; filename="z.txt"'))),
        "2", "z.exe", "extension:exe"),
    "declared type": (mail(multipart(text(), part(b"x", 'application/x-msdownload; name="data.bin"'))),
                      "2", "data.bin", "type:application/x-msdownload"),
    "MZ executable under an innocent name": (mail(multipart(text(), attach("photo.jpg", PE, "image/jpeg"))),
                                             "2", "photo.jpg", "detected:executable"),
    "ELF as the whole message body": (mail(part(b"\x7fELF\x02\x01\x01" + b"\x00" * 100)), "1", "",
                                      "detected:elf"),
    "executable in a zip": (mail(multipart(text(), attach("invoice.zip", zip_bytes({"docs/payload.exe": PE})))),
                            "2/invoice.zip:docs/payload.exe", "docs/payload.exe", "extension:exe"),
    "zip in a zip": (
        mail(multipart(text(), attach("outer.zip", zip_bytes({"readme.txt": b"hi",
                                                             "inner.zip": zip_bytes({"run.scr": b"x"})})))),
        "2/outer.zip:inner.zip:run.scr", "run.scr", "extension:scr"),
    "executable bytes in a zip in a zip": (
        mail(multipart(text(), attach("a.zip", zip_bytes({"b.zip": PE})))),
        "2/a.zip:b.zip", "b.zip", "detected:executable"),
    "zip under a harmless name and type": (
        mail(multipart(text(), attach("scan.pdf", zip_bytes({"scan.pdf.lnk": b"x"}), "application/pdf"))),
        "2/scan.pdf:scan.pdf.lnk", None, "double-extension:pdf.lnk"),
    "zip with junk in front": (
        mail(multipart(text(), attach("files.zip", b"JUNK" * 100 + zip_bytes({"x.hta": b"x"})))),
        "2/files.zip:x.hta", None, "extension:hta"),
    "truncated zip (local headers)": (
        mail(multipart(text(), attach("cut.zip", zip_bytes({"a.txt": b"a" * 3000, "b.js": os.urandom(5000)})[:-200]))),
        "2/cut.zip:b.js", None, "extension:js"),
    "two zips concatenated": (
        mail(multipart(text(), attach("two.zip", zip_bytes({"first.exe": b"x"}) + zip_bytes({"second.txt": b"y"})))),
        "2/two.zip:first.exe", None, "extension:exe"),
    "encrypted zip still lists names": (
        mail(multipart(text(), attach("secret.zip", zip_bytes({"Invoice.pdf.exe": b"x"}, encrypted=True)))),
        "2/secret.zip:Invoice.pdf.exe", None, "double-extension:pdf.exe"),
    "forwarded message": (
        mail(multipart(text(), part(mail(multipart(text(), attach("setup.msi", b"x"), boundary="inner")),
                                    "message/rfc822", encoding="7bit"))),
        "2.2", "setup.msi", "extension:msi"),
    "forwarded message, base64-encoded": (
        mail(multipart(text(), part(mail(multipart(text(), attach("x.ps1", b"x"), boundary="inner")),
                                    "message/rfc822"))),
        "2.2", "x.ps1", "extension:ps1"),
    "an attached .eml file": (
        mail(multipart(text(), attach("fwd.eml", mail(multipart(text(), attach("w.wsf", b"x"), boundary="e"))))),
        "2.2", "w.wsf", "extension:wsf"),
    "message inside a message inside a message": (
        mail(part(mail(part(mail(multipart(text(), attach("y.jse", b"x"), boundary="c")), "message/rfc822",
                            encoding="7bit")), "message/rfc822", encoding="7bit")),
        "1.1.2", "y.jse", "extension:jse"),
    "digest parts default to message/rfc822": (
        mail(multipart(b"\r\n" + mail(multipart(text(), attach("z.com", b"x"), boundary="d")), subtype="digest")),
        "1.2", "z.com", "extension:com"),
    "missing close delimiter": (mail(multipart(text(), attach("late.pif", b"x"), close=False)), "2", None,
                                "extension:pif"),
    "inner multipart left open, outer closed": (
        mail(multipart(text(), multipart(text(), boundary="inner", close=False), attach("after.lnk", b"x"))),
        "3", None, "extension:lnk"),
    "inner boundary repeated after its close delimiter": (
        mail(multipart(multipart(text(), boundary="inner") + b"--inner\r\n\r\n--inner--\r\n",
                       attach("p.cpl", b"x"))),
        "2", None, "extension:cpl"),
    "a part after the outer close delimiter": (
        mail(multipart(text()) + b"--=-=b=-=\r\n" + attach("epilogue.exe", b"x")), "2", None, "extension:exe"),
    "uuencoded in a text part": (
        mail(multipart(part(b"Hi,\r\n\r\nbegin 644 setup.exe\r\n" + b"M" + b"0" * 60 + b"\r\n`\r\nend\r\nbye\r\n",
                            "text/plain", encoding="7bit"))),
        "1/uu", "setup.exe", "extension:exe"),
    "iso disk image by its bytes": (
        mail(multipart(attach("photos.dat", b"\x00" * 0x8001 + b"CD001\x01" + b"\x00" * 100))),
        "1", None, "detected:iso"),
    "shortcut by its bytes": (
        mail(multipart(attach("notes", b"L\x00\x00\x00\x01\x14\x02\x00\x00\x00\x00\x00\xc0\x00\x00\x00\x00\x00\x00F"
                              + b"\x00" * 60))),
        "1", None, "detected:shortcut"),
    "base64 blocks padded one by one": (
        mail(multipart(b'Content-Type: application/octet-stream; name="x.dat"\r\n'
                       b"Content-Transfer-Encoding: base64\r\n\r\n"
                       + base64.b64encode(PE[:1]) + base64.b64encode(PE[1:100]) + b"\r\n" + b64(PE[100:]))),
        "1", None, "detected:executable"),
    "transfer encoding in quotes with a comment": (
        mail(multipart(b'Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: "BASE64" (x)\r\n\r\n'
                       + b64(PE))),
        "1", None, "detected:executable"),
    "quoted-printable executable": (
        mail(multipart(part(b"".join(b"=%02X" % c for c in PE[:200]).replace(b"=4D=5A", b"MZ"),
                            'application/octet-stream; name="x.dat"', encoding="quoted-printable"))),
        "1", None, "detected:executable"),
}


@pytest.mark.parametrize("case", list(CAUGHT), ids=list(CAUGHT))
def test_banned_attachment_is_caught(check, case):
    raw, location, name, rule = CAUGHT[case]
    verdict = verdict_of(check, raw)
    assert verdict.fate is Fate.REJECT, verdict.reason
    assert verdict.check == "banned" and verdict.kind == "banned"
    assert verdict.reason.startswith(f"part {location} "), verdict.reason
    assert verdict.reason.endswith(f" rule={rule}"), verdict.reason
    if name is not None:
        assert f' name="{shown(name)}" ' in verdict.reason, verdict.reason


PASSES = {
    "plain text": mail(text()),
    "a PDF": mail(multipart(text(), attach("report.pdf", PDF, "application/pdf"))),
    "a PDF named like an executable's base": mail(multipart(text(), attach("exe.pdf", PDF, "application/pdf"))),
    "an executable extension before a document one": mail(multipart(text(), attach("notes.exe.txt", b"hello"))),
    "text starting with MZ": mail(part(b"MZ is a postcode area in Germany. " * 10, "text/plain", encoding="7bit")),
    "a zip of documents": mail(multipart(text(), attach("docs.zip", zip_bytes({"a.pdf": PDF, "b/c.docx": b"x"})))),
    "an Office document (a zip inside)": mail(multipart(attach("q.docx", zip_bytes({"word/document.xml": b"<x/>"}),
                                                               "application/vnd.openxmlformats-officedocument"))),
    "an encrypted zip of documents": mail(multipart(attach("s.zip", zip_bytes({"s.pdf": b"x"}, encrypted=True)))),
    "a forwarded message with a PDF": mail(multipart(text(), part(mail(multipart(attach("r.pdf", PDF),
                                                                                   boundary="i")),
                                                                  "message/rfc822", encoding="7bit"))),
    "exe in the preamble and epilogue": (mail(b"Content-Type: multipart/mixed; boundary=q\r\n\r\n"
                                              b"Content-Disposition: attachment; filename=x.exe\r\n--q\r\n"
                                              + text() + b"\r\n--q--\r\nfilename=y.exe\r\n")),
}


@pytest.mark.parametrize("case", list(PASSES), ids=list(PASSES))
def test_clean_message_passes(check, case):
    verdict = verdict_of(check, PASSES[case])
    assert verdict.fate is Fate.ACCEPT, verdict.reason
    assert verdict.reason == "no banned attachment"


def test_the_reply_names_neither_part_nor_rule(check):
    verdict = verdict_of(check, CAUGHT["double extension"][0])
    assert verdict.reply == REJECT_CONTENT
    assert "exe" not in verdict.reply.text.lower() and "part" not in verdict.reply.text.lower()


def test_fate_quarantine_holds_instead_of_rejecting():
    check = BannedCheck(BannedSettings(files=[SHIPPED], fate="quarantine"))
    verdict = verdict_of(check, CAUGHT["executable in a zip"][0])
    assert verdict.fate is Fate.QUARANTINE and verdict.kind == "banned"


def test_a_forwarded_message_is_walked_in_place_whatever_its_size():
    check = BannedCheck(BannedSettings(files=[SHIPPED], max_archive_size="4KB"))
    inner = mail(multipart(part(b"y" * 100_000), attach("late.exe", b"x"), boundary="i"))
    verdict = verdict_of(check, mail(multipart(text(), part(inner, "message/rfc822", encoding="7bit"))))
    assert verdict.reason == 'part 2.2 name="late.exe" rule=extension:exe'


def test_a_hostile_name_is_escaped_in_the_reason(check):
    raw = mail(multipart(part(b"x", "application/octet-stream",
                              "attachment; filename*=UTF-8''a%22%0D%0Alevel%3Dcrit%20b.exe")))
    verdict = verdict_of(check, raw)
    assert verdict.fate is Fate.REJECT
    assert "\r" not in verdict.reason and "\n" not in verdict.reason
    assert 'name="a\\"\\u000d\\u000alevel=crit b.exe"' in verdict.reason


@pytest.mark.parametrize(("name", "rule"), [
    ("invoice.pdf.exe", "double-extension:pdf.exe"),
    ("invoice.PDF.Exe", "double-extension:pdf.exe"),
    ("a.exe", "extension:exe"),
    ("a.exe.", "extension:exe"),
    ("exe", None),
    (".exe", "extension:exe"),
    ("a.pdf", None),
    ("report\u202eexe.pdf", "bidi-override"),
    ("report\u2067exe.pdf", "bidi-override"),
    ("a\u200e.exe", "extension:exe"),
    ("a.\ufeffexe", "extension:exe"),
    ("archive.tar.gz", None),
])
def test_name_rules(name, rule):
    rules = BannedCheck(BannedSettings(files=[SHIPPED])).rules
    assert name_rule(rules, name) == rule


def test_normalise_name():
    assert normalise_name("C:\\x\\Rech\u00adnung.PDF\u200b.ExE . ") == "rechnung.pdf.exe"


PE_FAR_HEADER = PE[:0x3C] + struct.pack("<L", 1 << 20) + PE[0x40:0xC0]
"""e_lfanew beyond what is sniffed: the DOS stub's text decides."""


@pytest.mark.parametrize(("head", "kind"), [(PE, "executable"), (PE_FAR_HEADER, "executable"),
                                            (PE[:0xC0] + b"NE\x00\x00", None),
                                            (b"MZ" + b"\x00" * 300, None), (b"MZ", None), (PDF, None),
                                            (b"\x7fELF\x01", "elf"), (b"\xcf\xfa\xed\xfe" + b"\x00" * 8, "mach-o"),
                                            (zip_bytes({"a": b"b"}), "zip"), (b"Rar!\x1a\x07\x00", "rar"),
                                            (b"", None)])
def test_detect(head, kind):
    assert detect(head) == kind


# -- the rules files --------------------------------------------------------------------------------


def test_a_site_file_adds_and_allows(tmp_path):
    site = tmp_path / "site.toml"
    site.write_text('extensions = ["xyz"]\nallow_extensions = ["iso"]\nallow_detected_types = ["iso"]\n')
    check = BannedCheck(BannedSettings(files=[SHIPPED, site]))
    assert "xyz" in check.rules.extensions and "exe" in check.rules.extensions
    assert "iso" not in check.rules.extensions and "iso" not in check.rules.detected_types
    assert verdict_of(check, mail(multipart(attach("disk.iso", b"x")))).fate is Fate.ACCEPT
    assert verdict_of(check, mail(multipart(attach("a.xyz", b"x")))).reason.endswith("rule=extension:xyz")


def test_a_site_file_alone_replaces_the_shipped_set(tmp_path):
    site = tmp_path / "site.toml"
    site.write_text('extensions = ["xyz"]\nbidi_override = false\nencrypted_archives = true\n')
    check = BannedCheck(BannedSettings(files=[site]))
    assert verdict_of(check, CAUGHT["double extension"][0]).fate is Fate.ACCEPT
    assert verdict_of(check, CAUGHT["right-to-left override"][0]).fate is Fate.ACCEPT
    verdict = verdict_of(check, PASSES["an encrypted zip of documents"])
    assert verdict.reason == 'part 1/s.zip:s.pdf name="s.pdf" rule=encrypted-archive'


@pytest.mark.parametrize(("content", "where"), [
    ("extensions = [", "not valid TOML"),
    ('extensions = ["ex e"]', "extensions.0"),
    ('detected_types = ["exécutable"]', "detected_types.0"),
    ('extension = ["exe"]', "unknown key"),
])
def test_a_broken_rules_file_at_start_up_is_a_config_error(tmp_path, content, where):
    site = tmp_path / "site.toml"
    site.write_text(content)
    with pytest.raises(ConfigError, match=where):
        BannedCheck(BannedSettings(files=[SHIPPED, site]))


def test_the_shipped_default_is_the_shipped_file():
    assert BannedSettings().files[0].name == "banned.toml"
    assert BannedSettings().files[0].exists()


def test_rules_are_reloaded_when_the_file_changes_and_kept_when_it_breaks(tmp_path, caplog):
    site = tmp_path / "site.toml"
    site.write_text('extensions = ["aaa"]\n')
    clock = [1000.0]
    check = BannedCheck(BannedSettings(files=[site], check_interval=5), now=lambda: clock[0])
    aaa, bbb = mail(multipart(attach("x.aaa", b"x"))), mail(multipart(attach("x.bbb", b"x")))
    assert verdict_of(check, aaa).fate is Fate.REJECT

    site.write_text('extensions = ["bbb"]\n# changed\n')
    assert verdict_of(check, bbb).fate is Fate.ACCEPT, "re-read before check_interval has passed"
    clock[0] += 5
    assert verdict_of(check, bbb).fate is Fate.REJECT
    assert verdict_of(check, aaa).fate is Fate.ACCEPT

    site.write_text('extensions = ["ccc"\n')
    clock[0] += 5
    with caplog.at_level(logging.ERROR, logger="milters.banned"):
        assert verdict_of(check, bbb).fate is Fate.REJECT, "a broken file must keep the rules in use"
    assert any("not reloaded" in r.getMessage() and str(site) in str(r.__dict__.get("kv")) for r in caplog.records)

    site.write_text('extensions = ["ccc"]\n')
    clock[0] += 5
    assert verdict_of(check, mail(multipart(attach("x.ccc", b"x")))).fate is Fate.REJECT


def test_checks_from_many_threads_while_the_rules_change(tmp_path):
    """libmilter calls checks from several threads at once: each sees a whole rule set, old or new."""
    site = tmp_path / "site.toml"
    site.write_text('extensions = ["aaa"]\n')
    clock = [0.0]
    check = BannedCheck(BannedSettings(files=[SHIPPED, site], check_interval=0), now=lambda: clock[0])
    raws = [CAUGHT["executable in a zip"][0], PASSES["a PDF"], CAUGHT["right-to-left override"][0]]
    expected = [verdict_of(check, raw).reason for raw in raws]
    errors: list[str] = []

    def worker() -> None:
        for i in range(40):
            reason = verdict_of(check, raws[i % 3]).reason
            if reason != expected[i % 3]:
                errors.append(reason)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for i in range(20):
        site.write_text(f'extensions = ["aaa"]\n# edit {i}\n')
        clock[0] += 1
    for thread in threads:
        thread.join()
    assert not errors


# -- hostile input: always a verdict, in bounded time and memory -------------------------------------


def _fill(spool: Spool, head: bytes, line: bytes, total: int, tail: bytes) -> Spool:
    spool.write(head)
    block = line * max(1, (1 << 20) // len(line))
    while spool.size < total:
        spool.write(block)
    spool.write(tail)
    return spool


def _measured(check: BannedCheck, message: Message):
    """The verdict, the peak of Python allocations while checking, and the CPU seconds it took (CPU, not
    wall-clock: other test runs share the machine). tracemalloc slows Python code down several times."""
    tracemalloc.start()
    started = time.process_time()
    try:
        verdict = check.check(message)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return verdict, peak, time.process_time() - started


def test_a_50mb_attachment_is_walked_in_bounded_memory(check):
    line = base64.b64encode(os.urandom(57)) + b"\r\n"
    spool = _fill(Spool(), mail(b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n")
                  + attach("big.bin", b"")[:-2], line, 50 << 20, b"--B\r\n" + attach("tail.exe", b"x") + b"--B--\r\n")
    verdict, peak, elapsed = _measured(check, as_message(spool))
    assert verdict.reason == 'part 2 name="tail.exe" rule=extension:exe', "the part after the big one is seen"
    assert peak < 4 << 20, f"peak {peak} bytes for a {spool.size}-byte message"
    assert elapsed < 30


def test_a_50mb_zip_part_is_kept_on_disk_up_to_the_bound(check):
    line = base64.b64encode(b"PK\x03\x04" + os.urandom(53)) + b"\r\n"
    spool = _fill(Spool(), mail(multipart(text(), boundary="B")[:-len("--B--\r\n")] + b"--B\r\n")
                  + attach("huge.zip", b"")[:-2], line, 50 << 20, b"--B--\r\n")
    verdict, peak, _ = _measured(check, as_message(spool))
    assert verdict.fate is Fate.ACCEPT
    assert "archive 2/huge.zip over 26214400 bytes, not listed" in verdict.reason
    assert peak < 4 << 20, f"peak {peak} bytes"


def test_a_50mb_body_without_line_ends(check):
    spool = _fill(Spool(), mail(b"Content-Type: application/octet-stream\r\n\r\n"), b"A" * 4096, 50 << 20, b"")
    verdict, peak, elapsed = _measured(check, as_message(spool))
    assert verdict.fate is Fate.ACCEPT and peak < 4 << 20 and elapsed < 30


LINE_FLOODS = {
    "header lines": ("x.bin", "application/octet-stream", b"X-Junk: y\r\n"),
    "header continuation lines": ("x.bin", "application/octet-stream", b" y\r\n"),
    "padded quads in a zip": ("x.zip", "application/zip", b"QQ==" * 19 + b"\r\n"),
    "padding only in a zip": ("x.zip", "application/zip", b"=" * 76 + b"\r\n"),
    "Q= in a zip": ("x.zip", "application/zip", b"Q=" * 38 + b"\r\n"),
    "junk in a zip": ("x.zip", "application/zip", b"-" * 76 + b"\r\n"),
    "empty lines in a zip": ("x.zip", "application/zip", b"\r\n"),
    "empty lines in a binary": ("x.bin", "application/octet-stream", b"\r\n"),
    "dashes in a binary": ("x.bin", "application/octet-stream", b"--\r\n"),
    "near-boundaries in text": ("x.txt", "text/plain", b"--B-\r\n"),
    "begin lines in text": ("x.txt", "text/plain", b"begin 644 a\r\n"),
    "LF only in text": ("x.txt", "text/plain", b"\n"),
}


@pytest.mark.parametrize("case", list(LINE_FLOODS), ids=list(LINE_FLOODS))
def test_a_flood_of_lines_costs_little_time(check, case):
    """20 MB of short lines: the walk reads headers and bodies in blocks (a regular-expression search per
    64 KB), decodes a bounded amount of each part, and never turns a Python loop per line."""
    name, content_type, line = LINE_FLOODS[case]
    encoding = "7bit" if content_type.startswith("text/") else "base64"
    head = part(b"", content_type, f'attachment; filename="{name}"', encoding="7bit")
    head = head.replace(b"7bit", encoding.encode())
    in_header = case.startswith("header")  # the lines go into the part's header block
    spool = _fill(Spool(), mail(b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n")
                  + (head[:-2] if in_header else head), line, 20 << 20,
                  (b"\r\n" if in_header else b"") + b"--B\r\n" + attach("t.exe", b"x"))
    started = time.process_time()
    verdict = check.check(as_message(spool))
    assert time.process_time() - started < 1.5  # a Python turn per line took 2.5 s to 7.5 s
    assert verdict.reason == 'part 2 name="t.exe" rule=extension:exe'


def test_a_2mb_header_line(check):
    raw = mail(multipart(attach("a.txt", b"x"), part(b"x", "application/octet-stream; x=" + "y" * (2 << 20)
                                                     + '; name="z.exe"')),
               subject="s" * (2 << 20))
    verdict, peak, _ = _measured(check, as_message(raw))
    # the Content-Type field is cut at 64 KB: the name after 2 MB of junk is not seen, and the log says so
    assert verdict.fate is Fate.ACCEPT
    assert "not inspected: header of part 2 over 65536 bytes" in verdict.reason
    assert peak < 4 << 20


def test_deep_nesting_stops_at_the_bound_and_says_so(check):
    raw = b"".join(f"Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n".encode() for i in range(1000))
    raw = mail(raw + attach("deep.exe", b"x"))
    verdict, _, elapsed = _measured(check, as_message(raw))
    assert verdict.fate is Fate.ACCEPT
    assert "not inspected: depth>20 at " in verdict.reason
    assert elapsed < 10

    strict = BannedCheck(BannedSettings(files=[SHIPPED], on_limits="quarantine"))
    verdict = verdict_of(strict, raw)
    assert verdict.fate is Fate.QUARANTINE and verdict.kind == "unscanned"
    refuse = BannedCheck(BannedSettings(files=[SHIPPED], on_limits="reject"))
    assert verdict_of(refuse, raw).reply == REJECT_CONTENT


def test_nesting_within_the_bound_is_followed(check):
    raw = b"".join(f"Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n".encode() for i in range(15))
    verdict = verdict_of(check, mail(raw + attach("deep.exe", b"x")))
    assert verdict.reason == f'part {".".join(["1"] * 15)} name="deep.exe" rule=extension:exe'


def test_too_many_parts(check):
    raw = mail(multipart(*[text()] * 1100, attach("last.exe", b"x")))
    verdict = verdict_of(check, raw)
    assert verdict.fate is Fate.ACCEPT and "parts>1000" in verdict.reason


def test_many_archive_members_are_listed_up_to_the_budget(check):
    raw = mail(multipart(attach("many.zip", zip_bytes({f"f{i}.txt": b"" for i in range(3000)} | {"z.exe": b"x"}))))
    verdict, peak, elapsed = _measured(check, as_message(raw))
    assert verdict.fate is Fate.ACCEPT and "archive 1/many.zip: members>1000" in verdict.reason
    assert elapsed < 10 and peak < 4 << 20


def _bomb_layer(inner: bytes, copies: int, name: str) -> bytes:
    return zip_bytes({f"{name}{i}.zip": inner for i in range(copies)})


def _zeros_bomb() -> bytes:
    """A zip whose one member, zeros.zip, inflates to 200 MB (built without holding 200 MB)."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = b"\x00" * (1 << 20)
    data = b"".join(deflate.compress(zeros) for _ in range(200)) + deflate.flush()
    crc = 0
    for _ in range(200):
        crc = zlib.crc32(zeros, crc)
    name = b"zeros.zip"  # named as an archive: the check opens it, up to its byte bound
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(data), 200 << 20, len(name), 0)
    central = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, crc, len(data), 200 << 20, len(name),
                          0, 0, 0, 0, 0, 0)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central) + len(name),
                      len(local) + len(name) + len(data), 0)
    return local + name + data + central + name + end


ZEROS_BOMB = _zeros_bomb()


@pytest.mark.parametrize(("archive", "limit"), [
    (ZEROS_BOMB, "archive 1/bomb.zip:zeros.zip over 26214400 bytes, not listed"),
    (_bomb_layer(_bomb_layer(ZEROS_BOMB, 8, "l2-"), 8, "l1-"),
     "archive 1/bomb.zip:l1-0.zip:l2-0.zip:zeros.zip not opened: nested deeper than 2"),
], ids=["200 MB member", "nested 8x8"])
def test_a_zip_bomb_is_never_extracted_past_the_bounds(check, archive, limit):
    raw = mail(multipart(attach("bomb.zip", archive)))
    verdict, peak, elapsed = _measured(check, as_message(raw))
    assert verdict.fate is Fate.ACCEPT
    assert f"not inspected: {limit}" in verdict.reason
    assert peak < 8 << 20, f"peak {peak}"
    assert elapsed < 30


def test_archives_opened_per_message_are_bounded():
    check = BannedCheck(BannedSettings(files=[SHIPPED], max_archives=3))
    archive = _bomb_layer(zip_bytes({"ok.txt": b"x"}), 5, "a")
    verdict = verdict_of(check, mail(multipart(attach("many.zip", archive))))
    assert "archive 1/many.zip:a2.zip not opened: more than 3 archives" in verdict.reason


@pytest.mark.parametrize("garbage", [b"PK\x03\x04" + b"\xff" * 100, b"PK\x05\x06" + b"\x00" * 18,
                                     b"PK\x05\x06" + b"\xff" * 18, os.urandom(3000),
                                     b"PK\x01\x02" * 500 + b"PK\x05\x06\x00\x00\x00\x00\xff\xff\xff\xff"
                                     + struct.pack("<LL", 2000, 0) + b"\x00\x00"])
def test_a_corrupt_zip_gets_a_verdict(check, garbage):
    verdict = verdict_of(check, mail(multipart(attach("broken.zip", garbage))))
    assert verdict.fate is Fate.ACCEPT


HOSTILE = {
    "empty": b"",
    "one byte": b"x",
    "no body separator": b"Content-Type: multipart/mixed; boundary=x\r\n--x\r\n",
    "multipart without a boundary": mail(b"Content-Type: multipart/mixed\r\n\r\n--x\r\nhello\r\n"),
    "empty boundary": mail(b'Content-Type: multipart/mixed; boundary=""\r\n\r\n--\r\nhi\r\n----\r\n'),
    "boundary never starts": mail(b"Content-Type: multipart/mixed; boundary=x\r\n\r\nno parts here\r\n"),
    "NUL bytes everywhere": mail(b"Content-Type: multi\x00part/mixed; boundary=\x00\r\n\r\n--\x00\r\n\x00\x00\r\n"),
    "8-bit garbage headers": mail(b"Content-Type: \xff\xfe; name=\"\xc3\x28.exe\"\r\n"
                                  b"Content-Disposition: \x80\x81\r\n\r\n"),
    "bad RFC 2231": mail(multipart(part(b"x", "application/octet-stream",
                                        "attachment; filename*0*=bogus-charset''%ZZ%; filename*1*=%"))),
    "bad RFC 2047": mail(multipart(attach("=?x-unknown?B?!!!?= =?utf-8?Q?=ZZ?= =?rot13?Q?a?= =?a\x00b?B?QQ?=",
                                          b"x"))),
    "bad base64": mail(multipart(b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
                                 b"\r\n@@@@====****\r\n=\r\nQ=QQ=\r\n")),
    "bad uuencode": mail(part(b"begin 644 a.bin\r\n\xff\xff\xff\r\nM\r\nend\r\n", "text/plain", encoding="7bit")),
    "LF line ends": mail(multipart(text(), attach("lf.txt", b"x"))).replace(b"\r\n", b"\n"),
    "CR only": mail(multipart(text(), attach("cr.txt", b"x"))).replace(b"\r\n", b"\r"),
    "header continuation at the top": b" folded: nothing\r\n\r\nbody\r\n",
    "message/rfc822 that is empty": mail(multipart(part(b"", "message/rfc822", encoding="7bit"))),
    "encoded message that is garbage": mail(multipart(part(os.urandom(500), "message/rfc822"))),
    "10000 parts in a digest": mail(multipart(*[b"\r\n"] * 10000, subtype="digest")),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_input_gets_a_verdict(check, case):
    verdict, _, elapsed = _measured(check, as_message(HOSTILE[case]))
    assert verdict.check == "banned" and verdict.fate in (Fate.ACCEPT, Fate.REJECT)
    assert "inspection failed" not in verdict.reason  # an exception inside, caught by the last resort
    assert elapsed < 10


@pytest.mark.parametrize("settings", [
    {"max_parts": 1, "max_depth": 1, "max_archive_size": 0, "max_archive_members": 1, "max_archives": 1,
     "max_archive_depth": 0},
    {"max_parts": 2, "max_depth": 2, "max_archive_size": 100, "max_archive_members": 2, "max_archives": 2,
     "max_archive_depth": 1},
], ids=["smallest bounds", "small bounds"])
def test_every_case_gets_a_verdict_under_tiny_bounds(settings):
    check = BannedCheck(BannedSettings(files=[SHIPPED], on_limits="quarantine", **settings))
    for raw in [case[0] for case in CAUGHT.values()] + list(PASSES.values()) + list(HOSTILE.values()):
        verdict = verdict_of(check, raw)
        assert verdict.check == "banned" and verdict.fate in (Fate.ACCEPT, Fate.QUARANTINE, Fate.REJECT)
        assert "inspection failed" not in verdict.reason, raw[:300]


def test_lf_line_ends_are_walked_too(check):
    raw = mail(multipart(text(), attach("lf.exe", b"x"))).replace(b"\r\n", b"\n")
    assert verdict_of(check, raw).reason == 'part 2 name="lf.exe" rule=extension:exe'


def test_an_error_inside_the_walk_is_a_verdict_not_an_exception(check, monkeypatch, caplog):
    def broken(*_args, **_kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr(banned_module, "walk", broken)
    with caplog.at_level(logging.ERROR, logger="milters.banned"):
        verdict = verdict_of(check, mail(text()))
    assert verdict.fate is Fate.ACCEPT and "inspection failed (RuntimeError)" in verdict.reason
    assert any(r.exc_info for r in caplog.records)


FUZZ_TOKENS = (b"\r\n", b"--", b"=-=b=-=", b"boundary=", b"Content-Type: multipart/mixed; boundary=x\r\n", b"\r\n\r\n",
               b"=?", b"?=", b"*0*=", b"%", b"begin 644 a\r\n", b"PK\x03\x04", b"PK\x05\x06", b"message/rfc822",
               b"base64", b"\x00", b"\xff", b"=\r\n", b"\n", b"\r")


@pytest.mark.parametrize("seed", range(4))
def test_mutated_messages_never_reach_the_last_resort(seed):
    """Seeded random damage to real and generated messages (insertions of MIME syntax, cuts, flipped
    bytes, copied spans): an exception inside the walk would show as "inspection failed". This is how
    the hostile charset and broken encoded-word cases were found."""
    rnd = random.Random(seed)
    check = BannedCheck(BannedSettings(files=[SHIPPED], max_depth=8))
    seeds = [p.read_bytes() for p in CORPUS_FILES[seed::4]] + [case[0] for case in CAUGHT.values()]
    for _ in range(1500):
        raw = bytearray(rnd.choice(seeds))
        for _ in range(rnd.randint(1, 8)):
            if not raw:
                break
            at, op = rnd.randrange(len(raw)), rnd.random()
            if op < 0.3:
                raw[at:at] = rnd.choice(FUZZ_TOKENS)
            elif op < 0.5:
                del raw[at:at + rnd.randint(1, 200)]
            elif op < 0.7:
                raw[at] = rnd.randrange(256)
            elif op < 0.8:
                del raw[at:]
            else:
                start = rnd.randrange(len(raw))
                raw[at:at] = raw[start:start + rnd.randint(1, 500)]
        verdict = verdict_of(check, bytes(raw))
        assert "inspection failed" not in verdict.reason, bytes(raw)[:500]


# -- the walker on its own --------------------------------------------------------------------------


def test_fields_and_boundaries_cut_by_the_read_size_are_whole():
    """The walk reads 64 KB at a time: a folded Content-Disposition or a boundary line falling across two
    reads is seen whole, wherever the cut falls."""
    check = BannedCheck(BannedSettings(files=[SHIPPED]))
    disposition = b'Content-Disposition: attachment;\r\n filename*0="in";\r\n filename*1="v.e";\r\n filename*2="xe"\r\n'
    for shift in range(0, 160, 3):
        junk = b"X-Pad: " + b"p" * (CHUNK - 470 + shift) + b"\r\n"
        in_header = mail(multipart(text(), b"Content-Type: application/octet-stream\r\n" + junk + disposition
                                   + b"\r\nx\r\n"))
        assert verdict_of(check, in_header).reason.endswith('name="inv.exe" rule=extension:exe'), shift
        in_body = mail(multipart(part(b"p" * (CHUNK - 300 + shift), "text/plain", encoding="7bit"),
                                 attach("a.exe", b"x")))
        assert verdict_of(check, in_body).reason == 'part 2 name="a.exe" rule=extension:exe', shift


class _ShortReads(io.RawIOBase):
    """A file that gives at most ``size`` bytes a read, as a pipe or a socket may: the cuts between reads
    fall everywhere, not every 64 KB."""

    def __init__(self, data: bytes, size: int) -> None:
        self._data, self._size, self._pos = data, size, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = self._size if size < 0 else min(size, self._size)
        chunk = self._data[self._pos:self._pos + size]
        self._pos += len(chunk)
        return chunk


def _parts(raw: bytes, reader=None) -> list[tuple[str, list[str], str | None]]:
    """Every leaf the walker hands on: its path, its names and the type its first bytes say."""
    seen: list[tuple[str, list[str], str | None]] = []
    walk(reader or io.BytesIO(raw), lambda part, _w: bool(seen.append((part.path, part.names, detect(part.head)))))
    return seen


def _padded(pad: int, body: bytes, content_type: str = "image/jpeg", name: str = "photo.jpg") -> bytes:
    """A base64 part whose header carries ``pad`` bytes more, to move what follows it byte by byte."""
    return part(body, content_type, f'attachment; filename="{name}"', extra=f"X-Pad: {'p' * pad}\r\n")


BOUNDARIES = {"short": ("inner", "outer", "closed"),
              "long": ("_inner_0123456789abcdef", "_outer_0123456789abcdef", "_closed_0123456789abcdef")}
"""Boundaries of nested multiparts: short ones are searched for by a pattern, long ones (16 bytes and more,
as mail clients make them) by ``bytes.find`` first. No ``=`` in them: inside a base64 body one could end
a padded group (``test_junk_inside_base64_...`` below), which these tests are not about."""


@pytest.mark.parametrize("kind", list(BOUNDARIES))
def test_a_boundary_line_cut_by_the_read_at_every_byte_is_seen(kind):
    """The read ends at every byte of the boundary line after a large base64 part inside a nested multipart
    (its newline, the dashes, the boundary, the CRLF), and of the outer close delimiter: the parts after it
    are numbered and judged all the same."""
    inner_boundary, outer_boundary, _ = BOUNDARIES[kind]
    big = PE + os.urandom(CHUNK)

    def message(pad: int) -> bytes:
        inner = multipart(_padded(pad, big), attach("late.exe", b"x"), boundary=inner_boundary)
        return mail(multipart(inner, text(), boundary=outer_boundary))

    expected = [("1.1", ["photo.jpg"], "executable"), ("1.2", ["late.exe"], None), ("2", [], None)]
    plain = message(0)
    for line in (f"\r\n--{inner_boundary}\r\n".encode(), f"\r\n--{outer_boundary}--\r\n".encode()):
        at = plain.index(line, plain.index(b"X-Pad"))
        for cut in range(at - 2, at + len(line) + 2):  # where the 64 KB read ends, relative to the line
            pad = (CHUNK - cut) % CHUNK
            raw = message(pad)
            assert (raw.index(line, raw.index(b"X-Pad")) + cut - at) % CHUNK == 0
            assert _parts(raw) == expected, (line, cut)
    check = BannedCheck(BannedSettings(files=[SHIPPED]))
    assert verdict_of(check, message(5)).reason == 'part 1.1 name="photo.jpg" rule=detected:executable'


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1000])
def test_the_walk_does_not_depend_on_where_reads_end(size):
    """The same tree, names and first bytes from reads of any size (a pipe's, a socket's) as from 64 KB reads."""
    messages = [case[0] for case in CAUGHT.values()] + list(PASSES.values()) + [
        mail(multipart(multipart(_padded(0, PE + os.urandom(3000)), text(), boundary="in"),
                       part(b"Hi\r\nbegin 644 t.exe\r\nM" + b"0" * 60 + b"\r\nend\r\n", "text/plain", encoding="7bit"),
                       boundary="out")),
    ]
    for raw in messages:
        if len(raw) > 200_000:
            continue
        assert _parts(raw, _ShortReads(raw, size)) == _parts(raw), raw[:400]


ODD_BODY = PE + random.Random(7).randbytes(3000)
"""A Windows executable to be sent as ``photo.jpg`` with junk in its base64."""


def _junk_at(encoded: bytes, chars: int, junk: bytes) -> bytes:
    """``junk`` put into base64 text after ``chars`` characters of the alphabet (line ends not counted)."""
    seen = 0
    for at, byte in enumerate(encoded):
        if seen == chars:
            return encoded[:at] + junk + encoded[at:]
        seen += byte not in b"\r\n"
    raise ValueError(chars)


def _padded_one_by_one(data: bytes, seed: int) -> bytes:
    """``data`` cut at random places and each piece encoded on its own, padding and all, lines at random."""
    rnd, out, at = random.Random(seed), [], 0
    while at < len(data):
        size = rnd.randint(1, 200)
        out.append(base64.b64encode(data[at:at + size]) + rnd.choice([b"", b"\r\n", b"\r\n====\r\n"]))
        at += size
    return b"".join(out) + b"\r\n"


ENCODED = b64(ODD_BODY)
BASE64_JUNK = {
    "a stray = after 400 bytes of base64": ENCODED[:400] + b"=" + ENCODED[400:],
    **{f"a stray = after character {at} of a group": _junk_at(ENCODED, 388 + at, b"=") for at in range(4)},
    "a stray = at the very start": b"=" + ENCODED,
    "! characters": b"!".join(ENCODED[i:i + 37] for i in range(0, len(ENCODED), 37)),
    "a line of ====": _junk_at(ENCODED, 76 * 3, b"====\r\n"),
    "==== inside a line": _junk_at(ENCODED, 200, b"===="),
    "= and ! mixed": _junk_at(_junk_at(ENCODED, 390, b"!=!"), 101, b"=!"),
    "padded one by one": _padded_one_by_one(ODD_BODY, 1),
    "padded one by one, no line ends": _padded_one_by_one(ODD_BODY, 2).replace(b"\r\n", b""),
}
"""The executable's base64 with junk that lenient decoders (binascii, the email package, mail clients) read
past: what the walk decodes must be the executable, for the verdict and whatever the reads."""


def _photo(encoded: bytes, newline: bytes = b"\r\n") -> bytes:
    photo = (b'Content-Type: image/jpeg\r\nContent-Disposition: attachment; filename="photo.jpg"\r\n'
             b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded)
    return mail(multipart(text(), photo)).replace(b"\r\n", newline)


@pytest.mark.parametrize("newline", [b"\r\n", b"\n"], ids=["CRLF", "LF"])
@pytest.mark.parametrize("case", list(BASE64_JUNK), ids=list(BASE64_JUNK))
def test_junk_inside_base64_does_not_hide_an_executable(check, case, newline):
    """A stray ``=`` made the decoder drop the block before it (the first bytes the type is detected
    from); a padded group now ends its group and decoding goes on after it, any other ``=`` is skipped,
    and characters outside the alphabet are dropped, as lenient decoders do."""
    raw = _photo(BASE64_JUNK[case], newline)
    assert verdict_of(check, raw).reason == 'part 2 name="photo.jpg" rule=detected:executable'


def _heads(raw: bytes, reader=None) -> list[tuple[str, bytes]]:
    """Every leaf's path and first decoded bytes."""
    seen: list[tuple[str, bytes]] = []
    walk(reader or io.BytesIO(raw), lambda part, _w: bool(seen.append((part.path, part.head))))
    return seen


@pytest.mark.parametrize("case", list(BASE64_JUNK), ids=list(BASE64_JUNK))
def test_junk_inside_base64_decodes_the_same_whatever_the_reads(case):
    """The same bytes from reads of 1 to 80 bytes (and larger) as from 64 KB reads: a group cut by a read
    waits for the rest, an ``=`` at the end of a read for what follows it. Where the junk leaves every
    group whole (all but a lone ``=`` after the third character of a group), that is the executable
    itself."""
    for newline in (b"\r\n", b"\n"):
        raw = _photo(BASE64_JUNK[case], newline)
        expected = _heads(raw)
        assert expected[1][0] == "2"
        if case != "a stray = after character 3 of a group":
            assert expected[1][1] == ODD_BODY, case
        for size in [*range(1, 81), 127, 1000, 4096]:
            assert _heads(raw, _ShortReads(raw, size)) == expected, (case, newline, size)


def _lenient_base64(data: bytes) -> bytes:
    """Base64 decoded a character at a time, as the walk should decode it: other bytes dropped, ``xy==`` and
    ``xyz=`` ending a group, any other ``=`` skipped, a last unpadded group of two or three decoded."""
    out, group, pad_after_two = bytearray(), b"", False
    for byte in data:
        char = bytes([byte])
        if char == b"=":
            if len(group) == 3 or (len(group) == 2 and pad_after_two):
                out += binascii.a2b_base64(group + b"==")
                group, pad_after_two = b"", False
            elif len(group) == 2:
                pad_after_two = True
        elif (char.isalnum() and char.isascii()) or char in b"+/":
            group, pad_after_two = group + char, False
            if len(group) == 4:
                out += binascii.a2b_base64(group)
                group = b""
    if len(group) >= 2:
        out += binascii.a2b_base64(group + b"==")
    return bytes(out)


@pytest.mark.parametrize("seed", range(2))
def test_base64_decoding_matches_a_decoder_a_character_at_a_time(seed):
    """Random base64 text thick with ``=`` and junk, fed in blocks of random sizes: the decoder (patterns
    over the groups around an ``=``, binascii for the rest) gives what the one-character-at-a-time
    reference gives."""
    rnd = random.Random(seed)
    for _ in range(2000):
        alphabet = rnd.choice([b"QUJD", b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"])
        data = bytes(rnd.choice(alphabet + b"====\r\n!") for _ in range(rnd.randint(0, 80)))
        decoder, out, at = _Decoder("base64"), b"", 0
        while at < len(data):
            size = rnd.randint(1, 9)
            out += decoder.feed(data[at:at + size])
            at += size
        assert out + decoder.flush() == _lenient_base64(data), data


def test_padded_groups_past_the_bound_are_a_limit(check):
    """Decoding padded groups costs a Python turn each: past BASE64_BLOCKS in one part the rest of the part
    is not decoded, and the verdict says so."""
    raw = _photo(b"QQ==" * (BASE64_BLOCKS + 1) + b"\r\n" + b64(PE))
    verdict = verdict_of(check, raw)
    assert verdict.fate is Fate.ACCEPT
    assert f"not inspected: base64 of part 2 past {BASE64_BLOCKS} padded groups" in verdict.reason
    assert verdict_of(check, _photo(b"QQ==" * BASE64_BLOCKS + b64(PE))).reason.startswith("no banned attachment")


def _fake_boundaries(outer: str, closed: str) -> bytes:
    """Lines that look like boundaries and are not: of a multipart closed before, near misses of the open
    one, the open one mid-line or in another case."""
    lines = (f"--{closed}", f"--{closed}--", f"--{outer}X", f"--{outer[:-1]}", f"-- {outer}", f"--{outer}-",
             f"---{outer}", f"x--{outer}", f"--{outer.upper()}", "--")
    return "".join(line + "\r\n" for line in lines).encode()


@pytest.mark.parametrize("kind", list(BOUNDARIES))
def test_boundary_like_lines_inside_a_base64_body_do_not_end_it(kind):
    """Lines that look like boundaries inside a base64 or a text body are body: the part goes on to the real
    boundary, its first bytes decode, and the part after it keeps its number."""
    _, outer, closed = BOUNDARIES[kind]
    fakes = _fake_boundaries(outer, closed) * 50
    encoded = b64(PE + os.urandom(2000))
    big = (b'Content-Type: image/jpeg\r\nContent-Disposition: attachment; filename="photo.jpg"\r\n'
           b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded[:400] + fakes + encoded[400:])
    closed_part = multipart(text(), attach("a.txt", b"x"), boundary=closed)
    raw = mail(multipart(closed_part, big, attach("after.exe", b"x"), boundary=outer))
    assert _parts(raw) == [("1.1", [], None), ("1.2", ["a.txt"], None), ("2", ["photo.jpg"], "executable"),
                           ("3", ["after.exe"], None)]
    in_text = mail(multipart(closed_part, part(fakes, "text/plain", encoding="7bit"), attach("after.exe", b"x"),
                             boundary=outer))
    assert [path for path, _, _ in _parts(in_text)] == ["1.1", "1.2", "2", "3"]


@pytest.mark.parametrize("kind", list(BOUNDARIES))
def test_a_nested_multipart_after_and_inside_large_parts_is_followed(check, kind):
    """Multiparts and a forwarded message behind megabytes of text, HTML and base64 (many reads, no
    boundary in them): the attachment at the bottom is found at its place."""
    top, alt, fwd = BOUNDARIES[kind]
    filler = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n" * 40_000  # 3 MB
    html = part(filler.replace(b"Lorem", b"<p>Lorem"), "text/html; charset=utf-8", encoding="8bit")
    forwarded = mail(multipart(attach("big.bin", os.urandom(1 << 20)), attach("deep.exe", b"x"), boundary=fwd))
    alternative = multipart(part(filler, "text/plain", encoding="7bit"), html,
                            part(forwarded, "message/rfc822", encoding="7bit"), boundary=alt, subtype="alternative")
    raw = mail(multipart(part(filler, "text/plain", encoding="quoted-printable"), alternative, boundary=top))
    assert verdict_of(check, raw).reason == 'part 2.3.2 name="deep.exe" rule=extension:exe'
    assert [path for path, _, _ in _parts(raw)] == ["1", "2.1", "2.2", "2.3.1", "2.3.2"]


def test_a_uuencoded_file_anywhere_in_a_large_text_body_is_found(check):
    """A body outside any multipart is read to its end in blocks with nothing to stop at; the uuencoded
    files in it are still looked for in every block: at the very start, after megabytes, after a
    ``begin`` that is not at a line start, and with its ``begin`` line cut by the read."""
    uu = b"begin 644 setup.exe\r\nM" + b"0" * 60 + b"\r\n`\r\nend\r\n"
    filler = b"X" * 77 + b"\r\n"
    assert verdict_of(check, mail(part(uu + filler * 1000, "text/plain", encoding="7bit"))).reason == \
        'part 1/uu name="setup.exe" rule=extension:exe'
    late = mail(part(filler * 60_000 + b"no: xbegin 644 a.txt, begin 644 b.txt\r\n" + uu, "text/plain",
                     encoding="7bit"))
    assert verdict_of(check, late).reason == 'part 1/uu name="setup.exe" rule=extension:exe'
    head = mail(part(b"", "text/plain", encoding="7bit"))
    for cut in range(-3, 12):  # where the 64 KB read ends, relative to the begin line
        pad = CHUNK - len(head) - cut
        raw = head + b"y" * (pad - 2) + b"\r\n" + uu
        assert raw.index(b"begin") + cut == CHUNK
        assert verdict_of(check, raw).reason == 'part 1/uu name="setup.exe" rule=extension:exe', cut
    mid_line = mail(part(filler * 2000 + b"xx begin 644 setup.exe\r\nM" + b"0" * 60 + b"\r\nend\r\n", "text/plain",
                         encoding="7bit"))
    assert verdict_of(check, mid_line).reason == "no banned attachment"


@pytest.mark.parametrize("shape", ["text", "html in a multipart", "base64 in a multipart"])
def test_a_large_body_costs_little_cpu(check, shape):
    """20 MB of body costs about 1 ms of CPU per MB (a search for boundary lines and uuencode starts at C
    speed); a pattern without a literal start to scan for, tried at every byte, cost 12 ms per MB."""
    line = {"text": b"X" * 79 + b"\r\n", "html in a multipart": b"<p>Lorem ipsum dolor sit amet, consectetur</p>\r\n",
            "base64 in a multipart": base64.b64encode(os.urandom(57)) + b"\r\n"}[shape]
    if shape == "text":
        head, tail = mail(b"\r\n"), b""
    else:
        kind, encoding = ("text/html", "8bit") if shape.startswith("html") else ("application/pdf", "base64")
        head = mail(b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n" + text() + b"\r\n--B\r\n"
                    + f"Content-Type: {kind}\r\nContent-Transfer-Encoding: {encoding}\r\n\r\n".encode())
        tail = b"--B--\r\n"
    spool = _fill(Spool(), head, line, 20 << 20, tail)
    check.check(as_message(spool))  # patterns compiled, file cached
    started = time.process_time()
    verdict = check.check(as_message(spool))
    elapsed = time.process_time() - started
    assert verdict.reason == "no banned attachment"
    assert elapsed < 0.12, f"{elapsed * 1000:.0f} ms of CPU for 20 MB"


def test_walker_paths_follow_imap_numbering():
    raw = mail(multipart(text(), multipart(text(), attach("a.bin", b"x"), boundary="i"),
                         part(mail(multipart(text(), attach("b.bin", b"y"), boundary="m")), "message/rfc822",
                              encoding="7bit")))
    seen: list[tuple[str, list[str]]] = []
    walk(io.BytesIO(raw), lambda part, _w: bool(seen.append((part.path, part.names))))
    assert seen == [("1", []), ("2.1", []), ("2.2", ["a.bin"]), ("3.1", []), ("3.2", ["b.bin"])]


def test_walker_decodes_only_the_head_of_an_ordinary_part():
    sizes = []
    raw = mail(multipart(attach("big.bin", os.urandom(500_000))))
    walk(io.BytesIO(raw), lambda part, _w: bool(sizes.append((part.size, len(part.head), part.decoded))))
    [(size, head, decoded)] = sizes
    assert head == 40 * 1024 and size < 100_000 and decoded is None


def test_walker_limits_are_its_own():
    raw = mail(multipart(*[text()] * 5))
    result = walk(io.BytesIO(raw), lambda _p, _w: False, Limits(max_parts=3))
    assert result.limits == ["parts>3"]


# -- the corpus ---------------------------------------------------------------------------------------

CORPUS_FILES = sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.suffix not in (".md", ".tsv")
                      and not p.name.startswith(("LICENSE", "NOTICE")))


def test_the_corpus_is_there():
    assert len(CORPUS_FILES) > 200


@pytest.mark.parametrize("path", CORPUS_FILES, ids=[str(p.relative_to(CORPUS)) for p in CORPUS_FILES])
def test_corpus_message_gets_a_verdict(check, path):
    raw = path.read_bytes()
    verdict = verdict_of(check, raw)
    assert verdict.check == "banned"
    if re.search(rb"(?im)^content-type:\s*message/partial", raw):  # fragments: banned by the shipped rules
        assert verdict.reason.endswith("rule=type:message/partial"), verdict.reason
    else:  # nothing else in it is banned, and all of it was inspected
        assert verdict.reason == "no banned attachment"
