"""The protocol reader: strict about what cannot come from Postfix, indifferent to how bytes are split."""

from __future__ import annotations

import pytest
from harness.policyd_proc import encode_request
from hypothesis import given, settings
from hypothesis import strategies as st

from policyd.request import PolicyRequest, ProtocolError, RequestReader


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
