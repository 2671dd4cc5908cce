"""The protocol reader: strict about what cannot come from Postfix, indifferent to how bytes are split."""

from __future__ import annotations

import re

import pytest
from harness.policyd_proc import BASE_REQUEST, encode_request
from hypothesis import given, settings
from hypothesis import strategies as st

from policyd.request import _PAIR, POSTFIX_NAMES, PolicyRequest, ProtocolError, RequestReader, _split_short
from policyd.results import TransactionState


def test_one_request_in_any_split():
    data = encode_request(sender="a@example.org") + encode_request(sender="b@example.org")
    for size in (1, 2, 16, 128, 4096):
        reader = RequestReader()
        got = []
        for start in range(0, len(data), size):
            got += reader.feed(data[start:start + size])
        assert [r["sender"] for r in got] == ["a@example.org", "b@example.org"]
        assert not reader.partial


@pytest.mark.parametrize(("data", "error"), [
    (b"garbage\n\n", "not a name=value line"),
    (b"\n", "empty request"),
    (b"request=smtpd_access_policy\nprotocol_state=RCPT\nx=\x00\n\n", "NUL byte"),
    (b"protocol_state=RCPT\n\n", "expected smtpd_access_policy"),
    (b"request=junk\nprotocol_state=RCPT\n\n", "expected smtpd_access_policy"),
    (b"request=smtpd_access_policy\n\n", "protocol_state missing"),
    (b"Request=smtpd_access_policy\nprotocol_state=RCPT\n\n", "not a name=value line"),
    (b"a" * 9000, "line longer than 8192"),
    (b"request=smtpd_access_policy\n" + b"x=y\n" * 20000, "request longer than 65536"),
])
def test_malformed_input_is_a_protocol_error(data, error):
    with pytest.raises(ProtocolError, match=error):
        RequestReader().feed(data)


def test_eight_bit_values_are_kept_as_utf8():
    [attrs] = RequestReader().feed(encode_request(sender="jörg@exämple.org"))
    assert attrs["sender"] == "jörg@exämple.org"
    [attrs] = RequestReader().feed(encode_request(sender="XX").replace(b"sender=XX", b"sender=\xff"))
    assert attrs["sender"] == "\ufffd"


@pytest.mark.parametrize(("address", "expected"), [
    ("192.0.2.1", "192.0.2.1"), ("2001:db8::1", "2001:db8::1"), ("::ffff:192.0.2.7", "192.0.2.7"),
    ("not-an-ip", None), ("", None), ("fe80::1%eth0", "fe80::1"),
])
def test_client_addresses(address, expected):
    request = PolicyRequest.from_attrs({"client_address": address, "protocol_state": "rcpt"})
    assert (str(request.client_ip) if request.client_ip else None) == expected
    assert request.protocol_state == "RCPT"


@settings(max_examples=400, deadline=None)
@given(chunks=st.lists(st.one_of(st.binary(max_size=300), st.sampled_from([encode_request(), b"\n", b"=\n",
                                                                           b"\n\n"])), max_size=12))
def test_reader_never_fails_other_than_with_a_protocol_error(chunks):
    reader = RequestReader(max_line=512, max_request=4096)
    try:
        for chunk in chunks:
            for attrs in reader.feed(chunk):
                assert attrs["request"] == "smtpd_access_policy" and attrs["protocol_state"]
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.text(alphabet=st.characters(blacklist_characters="\n\x00", blacklist_categories=["Cs"]),
                               max_size=60), min_size=1, max_size=5),
       split=st.integers(min_value=1, max_value=64))
def test_any_well_formed_request_round_trips(values, split):
    data = b"".join(encode_request(sender=value.replace("\r", "")) for value in values)
    reader = RequestReader()
    got = []
    for start in range(0, len(data), split):
        got += reader.feed(data[start:start + split])
    assert [r["sender"] for r in got] == [v.replace("\r", "") for v in values]


def test_over_long_line_inside_a_complete_request_is_refused():
    data = b"request=smtpd_access_policy\nprotocol_state=RCPT\nsender=" + b"a" * 600 + b"\n\n"
    with pytest.raises(ProtocolError, match="line longer than 512 bytes"):
        RequestReader(max_line=512).feed(data)


# -- one request, every way it can arrive and every way it can be wrong (both parsing paths) ------------------

HEAD = b"request=smtpd_access_policy\nprotocol_state=RCPT\n"
LONG_LINE = b"size=" + b"9" * 500 + b"\n"
"""A well-formed line that takes a request past max_line=512: the reader's other path (line limits checked)."""


def error_of(data: bytes, max_line: int = 512, max_request: int = 65536) -> str:
    """The whole ProtocolError message for ``data`` fed in one piece (messages are logged and counted by kind)."""
    with pytest.raises(ProtocolError) as raised:
        RequestReader(max_line=max_line, max_request=max_request).feed(data)
    return str(raised.value)


def realistic_request() -> bytes:
    """A full Postfix RCPT request with what real ones carry: '=' in a value (BATV sender), 8-bit and invalid
    UTF-8, a trailing CR, an empty value and an attribute Postfix does not (yet) send."""
    return encode_request(sender="prvs=1234abcd=bounce@example.org", helo_name="mx\r", client_name="h\xe9te.example",
                          queue_id="", x_future_attribute="1").replace(b"h\xc3\xa9te", b"h\xe9\xffte")


@pytest.mark.parametrize("max_line", [8192, 256])
def test_a_request_split_at_every_byte_gives_the_same_attributes(max_line):
    data = realistic_request() + encode_request(sender="second@example.org")
    [first, second] = RequestReader(max_line=max_line).feed(data)
    assert first["sender"] == "prvs=1234abcd=bounce@example.org" and first["helo_name"] == "mx"
    assert first["client_name"] == "h\ufffd\ufffdte.example" and first["x_future_attribute"] == "1"
    assert first["queue_id"] == "" and second["sender"] == "second@example.org"
    for cut in range(1, len(data)):
        reader = RequestReader(max_line=max_line)
        assert reader.feed(data[:cut]) + reader.feed(data[cut:]) == [first, second], cut
        assert not reader.partial
    reader = RequestReader(max_line=max_line)
    assert [attrs for byte in range(len(data)) for attrs in reader.feed(data[byte:byte + 1])] == [first, second]


@pytest.mark.parametrize("pad", [b"", LONG_LINE], ids=["short", "past-max-line"])
@pytest.mark.parametrize(("line", "error"), [
    (b"x=a\x00b", "NUL byte in request (binary data, not the policy protocol)"),
    (b"x\x00=b", "NUL byte in request (binary data, not the policy protocol)"),
    (b"garbage", "not a name=value line: 'garbage'"),
    (b"sender", "not a name=value line: 'sender'"),
    (b"=value", "not a name=value line: '=value'"),
    (b"Sender=a", "not a name=value line: 'Sender=a'"),
    (b"sen-der=a", "not a name=value line: 'sen-der=a'"),
    (b" sender=a", "not a name=value line: ' sender=a'"),
    (b"sender =a", "not a name=value line: 'sender =a'"),
    (b"sender\r=a", "not a name=value line: 'sender\\r=a'"),
    (b"s\xc3\xa9nder=a", "not a name=value line: 's\\\\xc3\\\\xa9nder=a'"),
    (b"n" * 65 + b"=a", "not a name=value line: '" + "n" * 40 + "'"),
    (b"x" * 600, "line longer than 512 bytes"),
])
def test_every_malformed_line_gives_its_message(line, error, pad):
    assert error_of(HEAD + pad + line + b"\n\n") == error


@pytest.mark.parametrize("pad", [b"", LONG_LINE], ids=["short", "past-max-line"])
@pytest.mark.parametrize(("request_lines", "error"), [
    (b"protocol_state=RCPT\n", "request='(missing)', expected smtpd_access_policy"),
    (b"request=junk\nprotocol_state=RCPT\n", "request='junk', expected smtpd_access_policy"),
    (b"request=smtpd_access_policy\r\nprotocol_state=RCPT\nrequest=other\n",
     "request='other', expected smtpd_access_policy"),
    (b"request=smtpd_access_policy\n", "protocol_state missing"),
    (b"request=smtpd_access_policy\nprotocol_state=\r\n", "protocol_state missing"),
])
def test_a_request_that_is_not_a_policy_request_gives_its_message(request_lines, error, pad):
    assert error_of(pad + request_lines + b"\n") == error


@pytest.mark.parametrize("pad", [b"", LONG_LINE], ids=["short", "past-max-line"])
def test_names_postfix_may_add_and_the_longest_name_are_accepted(pad):
    [attrs] = RequestReader(max_line=512).feed(HEAD + pad + b"n" * 64 + b"=a\nnew_attr_2=b=c\r\r\nx=\n\n")
    assert attrs["n" * 64] == "a" and attrs["new_attr_2"] == "b=c" and attrs["x"] == ""


def test_the_known_postfix_names_are_all_well_formed():
    assert all(re.fullmatch(r"[a-z0-9_]{1,64}", name) for name in POSTFIX_NAMES)
    assert set(BASE_REQUEST) <= POSTFIX_NAMES  # a real Postfix request needs no per-name check


def test_a_repeated_attribute_keeps_its_first_place_and_last_value():
    [attrs] = RequestReader().feed(b"sender=a\nrequest=smtpd_access_policy\nprotocol_state=RCPT\nsender=b\n\n")
    assert list(attrs) == ["sender", "request", "protocol_state"] and attrs["sender"] == "b"


def test_carriage_returns_end_a_value_but_not_inside_it():
    [attrs] = RequestReader().feed(HEAD + b"sender=a\rb\r\r\nrecipient=\r\n\n")
    assert attrs["sender"] == "a\rb" and attrs["recipient"] == ""


def test_empty_and_over_long_requests_keep_their_messages():
    assert error_of(encode_request() + b"\n") == "empty request (a blank line with no attributes)"
    assert error_of(HEAD + b"x=y\n" * 300 + b"\n", max_request=1024) == "request longer than 1024 bytes"
    assert error_of(HEAD + b"x=y\n" * 300, max_request=1024) == "request longer than 1024 bytes"  # not ended yet
    assert error_of(HEAD + b"x=" + b"y" * 520) == "line longer than 512 bytes"


def test_every_field_gets_the_attribute_of_its_name():
    names = ("protocol_state", "client_name", "helo_name", "sender", "recipient", "sasl_username", "queue_id",
             "instance")
    attrs = {name: f"{name.upper()}-value" for name in names}
    attrs |= {"client_address": "::ffff:192.0.2.7", "recipient_count": "3"}
    request = PolicyRequest.from_attrs(attrs)
    assert {name: getattr(request, name) for name in names} == {name: attrs[name].upper() if name == "protocol_state"
                                                                else attrs[name] for name in names}
    assert request.attrs is attrs and request.client_address == "::ffff:192.0.2.7"
    assert str(request.client_ip) == "192.0.2.7" and request.recipient_count == 3
    assert isinstance(request.transaction, TransactionState) and request.skip == set()
    shared = TransactionState()
    assert PolicyRequest.from_attrs(attrs, shared).transaction is shared


@pytest.mark.parametrize(("count", "expected"), [(None, 0), ("", 0), ("0", 0), ("7", 7), (" 7 ", 7), ("x", 0)])
def test_recipient_count(count, expected):
    attrs = {"protocol_state": "RCPT"} | ({} if count is None else {"recipient_count": count})
    assert PolicyRequest.from_attrs(attrs).recipient_count == expected


NAMES = st.sampled_from([b"sender", b"x_1", b"n" * 64, b"", b"n" * 65, b"Zz", b"a-b", b"a b", b"\xc3\xa9", b"a\r",
                         b"a\0"])
VALUES = st.lists(st.sampled_from([b"v", b"=", b"\r", b"\0", b" ", b"\xc3\xa9", b"\xff", b"\xe2\x82"]), max_size=4)
LINES = st.tuples(NAMES, st.sampled_from([b"=", b"", b"=="]), VALUES.map(b"".join)).map(b"".join)
"""Lines as requests have them, one part at a time made wrong: the name, the '=', the value."""


@settings(max_examples=1000, deadline=None)
@given(lines=st.lists(LINES, min_size=1, max_size=6))
def test_the_short_path_accepts_and_splits_exactly_like_the_pattern(lines):
    """The path for requests under the line limit against the regex one it stands for."""
    block = b"\n".join(lines)
    reader = RequestReader()
    fits = reader._well_formed.fullmatch(block) is not None
    assert _split_short(block) == (dict(_PAIR.findall(block.decode("utf-8", "replace"))) if fits else None)


@pytest.mark.parametrize("block", [b"sender=recipient=x\nqueue_id", b"queue_id\nsender=recipient=x",
                                   b"sender=a=b\nrecipient=c\nsize", b"sender\nrecipient==x"])
def test_a_line_without_equals_is_refused_even_when_another_has_two(block: bytes) -> None:
    """The short path's alternation check: as many '=' as lines is not one per line (read as names and values
    in turn, these would give well-formed names)."""
    assert _split_short(block) is None


@pytest.mark.parametrize("address", ["192.0.2.1", "10.0.0.255", "2001:db8::1", "2001:DB8:0:0:0:0:0:1",
                                     "::ffff:192.0.2.7", "fe80::1%eth0", "192.0.2.1%eth0", "::1", "", "junk",
                                     "192.0.2.01", "0.0.0.0"])
def test_the_client_address_text_is_the_parsed_address_printed(address: str) -> None:
    """client_ip_text stands for str(client_ip) in the block list's and the greylist's keys."""
    request = PolicyRequest.from_attrs({"protocol_state": "RCPT", "client_address": address})
    assert request.client_ip_text == ("" if request.client_ip is None else str(request.client_ip))
