"""What spamd is sent of a large message: the structure and the start of every part, within max_size, so a
pitch behind a large harmless part is still scored (SpamAssassin reads 50 KB of each part anyway)."""

from __future__ import annotations

import email
import email.policy
import io

from milters.spam_sample import sample

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
MB = 1 << 20


def parts(data: bytes) -> list[email.message.Message]:
    return list(email.message_from_bytes(data, policy=email.policy.compat32).walk())


def test_a_small_message_is_sent_as_it_is():
    raw = b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\nthere\r\n"
    assert sample(io.BytesIO(raw), MB, 64 << 10) == raw


def test_the_pitch_behind_a_large_part_is_sent():
    raw = (b"From: a@example.org\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=\"outer\"\r\n\r\npreamble\r\n--outer\r\n"
           b"Content-Type: text/plain\r\n\r\n" + b"lorem ipsum dolor sit amet\r\n" * 80_000
           + b"--outer\r\nContent-Type: text/plain\r\n\r\n" + GTUBE + b"\r\n--outer--\r\nepilogue\r\n")
    assert len(raw) > 2 * MB
    sent = sample(io.BytesIO(raw), MB, 64 << 10)
    assert GTUBE in sent and len(sent) < 70 << 10
    walked = parts(sent)
    assert [p.get_content_type() for p in walked] == ["multipart/mixed", "text/plain", "text/plain"]
    assert GTUBE.decode() in walked[2].get_payload()


def test_nested_messages_and_multiparts_keep_their_structure():
    inner = (b"Content-Type: message/rfc822\r\n\r\nFrom: b@example.org\r\nSubject: fwd\r\n"
             b"Content-Type: multipart/alternative; boundary=in\r\n\r\n--in\r\nContent-Type: text/plain\r\n\r\n"
             + b"x" * 76 + b"\r\n" + (b"y" * 76 + b"\r\n") * 30_000 + b"--in\r\nContent-Type: text/html\r\n\r\n<p>"
             + GTUBE + b"</p>\r\n--in--\r\n")
    raw = (b"From: a@example.org\r\nContent-Type: multipart/mixed;\r\n boundary=\"out er\"\r\n\r\n--out er\r\n"
           + inner + b"--out er--\r\n")
    sent = sample(io.BytesIO(raw), MB, 16 << 10)
    assert GTUBE in sent and len(sent) < 40 << 10
    assert "text/html" in [p.get_content_type() for p in parts(sent)]


def test_the_sample_never_exceeds_max_size_and_huge_lines_come_in_pieces():
    raw = b"From: a@example.org\r\nX-Long: " + b"h" * (2 * MB) + b"\r\nSubject: s\r\n\r\n" + GTUBE + b"\r\n"
    sent = sample(io.BytesIO(raw), MB, 64 << 10)
    assert len(sent) <= MB and GTUBE in sent, "the body after a 2 MB header line was lost"
    assert b"\r\n\r\n" + GTUBE in sent, "the header block no longer ends before the body"
    many = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + (b"--b\r\n\r\n" + b"z" * 100_000 + b"\r\n") * 40
    assert len(sample(io.BytesIO(many), MB, 64 << 10)) == MB


def test_a_boundary_that_never_comes_leaves_one_part_sampled():
    raw = (b"Content-Type: multipart/mixed; boundary=gone\r\n\r\n--gone\r\nContent-Type: text/plain\r\n\r\n"
           + b"body line\r\n" * 200_000 + GTUBE + b"\r\n")
    sent = sample(io.BytesIO(raw), MB, 64 << 10)
    assert len(sent) < 70 << 10 and sent.startswith(b"Content-Type: multipart/mixed")


def test_a_long_body_line_cut_short_still_lets_the_next_boundary_start_a_line():
    raw = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\n" + b"q" * 200_000
           + b"\r\n--b\r\n\r\n" + GTUBE + b"\r\n--b--\r\n")
    sent = sample(io.BytesIO(raw), MB, 4 << 10)
    assert b"\r\n--b\r\n\r\n" + GTUBE in sent
