"""phishhook.networks: address classes, the shipped relay groups, a site's own relay file and its importer,
reloading, and classification speed over Apple-sized lists."""

from __future__ import annotations

import ipaddress
import logging
import random
import time
from pathlib import Path

import phish_places as pp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mailwarden.rules_files import shipped_rules_file
from phishhook.networks import (
    RELAYS_FILE,
    AddressClass,
    Classified,
    NetworkClassifier,
    NetworkSettings,
    RelayFileError,
    _RangeTable,
    check_relay_files,
    import_relay_list,
    read_relay_file,
    write_relay_file,
)

SHIPPED = Path(__file__).resolve().parents[1] / "rules" / "phishhook" / "relays.toml"

P, T, R, U, X = (AddressClass.PRIVATE, AddressClass.TRUSTED, AddressClass.RELAY, AddressClass.PUBLIC,
                 AddressClass.INVALID)


@pytest.fixture(scope="module")
def classifier() -> NetworkClassifier:
    return NetworkClassifier(NetworkSettings(trusted=["198.51.100.0/25", "2001:db8:aaaa::/48", "40.107.99.0/24"]),
                             shipped=SHIPPED)


@pytest.mark.parametrize(("address", "kind", "group", "normalised"), [
    ("10.1.2.3", P, "", "10.1.2.3"),
    ("172.16.0.1", P, "", "172.16.0.1"),
    ("172.31.255.255", P, "", "172.31.255.255"),
    ("192.168.1.1", P, "", "192.168.1.1"),
    ("127.0.0.1", P, "", "127.0.0.1"),
    ("169.254.1.1", P, "", "169.254.1.1"),
    ("100.64.0.1", P, "", "100.64.0.1"),  # CGNAT
    ("100.127.255.255", P, "", "100.127.255.255"),
    ("0.0.0.0", P, "", "0.0.0.0"),
    ("224.0.0.1", P, "", "224.0.0.1"),
    ("::1", P, "", "::1"),
    ("fd12:3456::1", P, "", "fd12:3456::1"),  # ULA
    ("fe80::1%eth0", P, "", "fe80::1"),  # link-local with a zone id
    ("::ffff:10.0.0.1", P, "", "10.0.0.1"),
    ("172.32.0.1", U, "", "172.32.0.1"),  # just past 172.16.0.0/12
    ("100.128.0.1", U, "", "100.128.0.1"),  # just past CGNAT
    ("192.0.2.1", U, "", "192.0.2.1"),  # documentation ranges: public here
    ("198.51.100.200", U, "", "198.51.100.200"),
    ("203.0.113.9", U, "", "203.0.113.9"),
    ("2001:db8::1", U, "", "2001:db8::1"),
    (pp.US_BOSTON_A, U, "", pp.US_BOSTON_A),
    (pp.CN_BEIJING_V6, U, "", pp.CN_BEIJING_V6),
    ("::ffff:81.2.69.142", U, "", "81.2.69.142"),
    ("2001:0DB8:0000:0000:0000:0000:0000:0001", U, "", "2001:db8::1"),
    ("198.51.100.5", T, "198.51.100.0/25", "198.51.100.5"),
    ("2001:db8:aaaa::5", T, "2001:db8:aaaa::/48", "2001:db8:aaaa::5"),
    ("40.107.99.1", T, "40.107.99.0/24", "40.107.99.1"),  # trusted wins over a relay group
    (pp.MS_OUTLOOK, R, "microsoft-outlook", pp.MS_OUTLOOK),
    ("2603:1036::1", R, "microsoft-outlook", "2603:1036::1"),
    ("[IPv6:2a01:111:f400::1]", R, "microsoft-outlook", "2a01:111:f400::1"),
    ("209.85.128.1", R, "google-fetchers", "209.85.128.1"),
    (pp.GOOGLE_FETCHER_V6, R, "google-fetchers", pp.GOOGLE_FETCHER_V6),
    ("172.224.224.1", R, "apple-private-relay", "172.224.224.1"),
    ("104.28.1.1", R, "cloudflare-warp", "104.28.1.1"),
    ("165.225.0.1", R, "zscaler", "165.225.0.1"),
    ("163.116.200.1", R, "netskope", "163.116.200.1"),
    ("", X, "", ""),
    ("999.1.1.1", X, "", "999.1.1.1"),
    ("1.2.3", X, "", "1.2.3"),
    ("10.0.0.0/8", X, "", "10.0.0.0/8"),
    ("unknown", X, "", "unknown"),
    ("2001:db8::1::1", X, "", "2001:db8::1::1"),
])
def test_classification(classifier, address, kind, group, normalised):
    assert classifier.classify(address) == Classified(kind, group, normalised)


def test_junk_is_cut_to_a_bounded_length(classifier):
    classified = classifier.classify("x" * 300)
    assert classified.kind is X and len(classified.address) <= 64


def test_the_shipped_groups_are_documented_and_sourced():
    groups = read_relay_file(SHIPPED)
    assert set(groups) == {"microsoft-outlook", "google-fetchers", "apple-private-relay", "cloudflare-warp",
                           "zscaler", "netskope"}
    for group in groups.values():
        assert group.networks and group.description and group.source, group.name
        assert "snapshot" in group.description.lower() or "subset" in group.description.lower(), group.name
    assert groups["apple-private-relay"].source == "https://mask-api.icloud.com/egress-ip-ranges.csv"
    assert "import" in groups["apple-private-relay"].description
    for expected in ("40.92.0.0/15", "40.107.0.0/16", "52.100.0.0/14", "104.47.0.0/17", "2a01:111:f400::/48"):
        assert expected in groups["microsoft-outlook"].networks


def test_the_shipped_file_holds_none_of_the_test_addresses():
    """The documentation ranges and the realistic addresses must stay public, or tests would prove nothing."""
    networks = [ipaddress.ip_network(n) for g in read_relay_file(SHIPPED).values() for n in g.networks]
    for address in ("192.0.2.1", "198.51.100.1", "203.0.113.1", "2001:db8::1", pp.US_BOSTON_A, pp.US_BOSTON_B,
                    pp.US_CAMBRIDGE, pp.CN_BEIJING, pp.JP_TOKYO, pp.CN_BEIJING_V6, pp.JP_CHOFU_V6, pp.TEST_LONDON,
                    pp.TEST_CHANGCHUN, pp.TEST_MILTON, pp.TEST_LINKOPING, pp.TEST_JAPAN_V6):
        ip = ipaddress.ip_address(address)
        assert not [n for n in networks if ip in n], address


def test_the_shipped_file_is_found_where_policyd_finds_rules():
    found = NetworkClassifier(NetworkSettings())
    assert found.shipped == shipped_rules_file(RELAYS_FILE)
    assert found.shipped.read_bytes() == SHIPPED.read_bytes()
    assert found.classify(pp.MS_OUTLOOK).kind is R


def test_a_disabled_group_is_public(tmp_path):
    classifier = NetworkClassifier(NetworkSettings(relay_groups_disabled=["zscaler"]), shipped=SHIPPED)
    assert classifier.classify("165.225.0.1").kind is U
    assert classifier.classify(pp.MS_OUTLOOK).kind is R
    assert "zscaler" not in classifier.groups


def test_a_disabled_group_that_does_not_exist_is_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="mailwarden.phishhook.networks"):
        NetworkClassifier(NetworkSettings(relay_groups_disabled=["zscalar"]), shipped=SHIPPED)
    assert caplog.records[0].kv["groups"] == "zscalar"
    assert "no relay group named zscalar" in check_relay_files(NetworkSettings(relay_groups_disabled=["zscalar"]),
                                                               SHIPPED)[0]
    assert check_relay_files(NetworkSettings(), SHIPPED) == []


def test_a_site_file_replaces_a_shipped_group_and_adds_its_own(tmp_path):
    site = tmp_path / "relays.toml"
    write_relay_file(site, {"apple-private-relay": ["192.0.2.0/25"], "our-proxy": ["2001:db8:1::/48"]},
                     sources={"apple-private-relay": "https://mask-api.icloud.com/egress-ip-ranges.csv"})
    classifier = NetworkClassifier(NetworkSettings(relay_file=site), shipped=SHIPPED)
    assert classifier.classify("192.0.2.1") == Classified(R, "apple-private-relay", "192.0.2.1")
    assert classifier.classify("172.224.224.1").kind is U  # the shipped subset is replaced, not merged
    assert classifier.classify("2001:db8:1::9").group == "our-proxy"
    assert classifier.classify(pp.MS_OUTLOOK).group == "microsoft-outlook"
    assert read_relay_file(site)["apple-private-relay"].source.startswith("https://mask-api")
    assert classifier.networks_count == sum(len(g.networks) for g in classifier.groups.values())


def test_nested_prefixes_the_most_specific_wins(tmp_path):
    site = tmp_path / "relays.toml"
    write_relay_file(site, {"outer": ["192.0.2.0/24"], "inner": ["192.0.2.64/26"], "innermost": ["192.0.2.80/32"]})
    classifier = NetworkClassifier(NetworkSettings(relay_file=site), shipped=SHIPPED)
    assert [classifier.classify(f"192.0.2.{n}").group for n in (0, 63, 64, 79, 80, 81, 127, 128, 255)] == \
        ["outer", "outer", "inner", "inner", "innermost", "inner", "inner", "outer", "outer"]
    assert classifier.classify("192.0.3.0").kind is U


@st.composite
def crowded_network(draw) -> ipaddress.IPv4Network:
    """A network among the first 16,384 addresses, /20 to /32: a few dozen of them nest and overlap a lot."""
    prefix = draw(st.integers(min_value=20, max_value=32))
    base = draw(st.integers(min_value=0, max_value=(1 << 14) - 1))
    return ipaddress.ip_network((base >> (32 - prefix) << (32 - prefix), prefix))


@settings(max_examples=200, deadline=None)
@given(networks=st.lists(crowded_network(), max_size=30),
       probes=st.lists(st.integers(min_value=0, max_value=(1 << 14) - 1), max_size=40))
def test_the_range_table_agrees_with_a_linear_scan(networks, probes):
    labelled = [(int(n.network_address), int(n.broadcast_address), f"g{i}") for i, n in enumerate(networks)]
    table = _RangeTable(labelled)

    def reference(value: int) -> str | None:
        found = [(n.prefixlen, i) for i, n in enumerate(networks) if ipaddress.ip_address(value) in n]
        return f"g{max(found)[1]}" if found else None  # the most specific; the later of equal prefixes

    edges = [int(edge) + step for n in networks for edge in (n.network_address, n.broadcast_address)
             for step in (-1, 0, 1)]
    for value in probes + [edge for edge in edges if edge >= 0]:
        assert table.find(value) == reference(value), value
    assert all(a <= b for a, b in zip(table.starts, table.ends, strict=True))
    assert all(b < c for b, c in zip(table.ends, table.starts[1:], strict=False))  # disjoint, sorted


# --- the importer ---

APPLE_CSV = """\
172.224.226.0/27,GB,GB-EN,London,
172.224.226.32/27,GB,GB-EN,London,
2a02:26f7:b3c0:4000::/64,GB,GB-EN,London,
104.28.0.72/32,US,US-CA,Los Angeles,

146.75.164.0/24,DE,DE-BE,Berlin,
"""


def test_import_apple_csv():
    assert import_relay_list("apple-private-relay", APPLE_CSV) == [
        "172.224.226.0/27", "172.224.226.32/27", "2a02:26f7:b3c0:4000::/64", "104.28.0.72/32", "146.75.164.0/24"]


def test_import_plain_cidrs_with_comments_duplicates_and_bare_addresses():
    text = "# Zscaler\n165.225.0.0/17\n  165.225.0.0/17  # again\n\n185.46.212.7\n2605:4300::1/32\n"
    assert import_relay_list("zscaler", text) == ["165.225.0.0/17", "185.46.212.7/32", "2605:4300::/32"]


@pytest.mark.parametrize(("text", "says"), [
    ("172.224.226.0/27,GB,GB-EN,London,\nnot-a-network,GB,,,\n", "apple-private-relay: line 2: 'not-a-network"),
    ("10.0.0.0/33\n", "line 1"),
    ("<html><body>Access denied</body></html>\n", "line 1"),
    ("# only comments\n\n", "holds no network"),
    ("", "holds no network"),
])
def test_import_refuses_a_bad_list_naming_the_line(text, says):
    with pytest.raises(RelayFileError, match="apple-private-relay") as caught:
        import_relay_list("apple-private-relay", text)
    assert says in str(caught.value)


def test_an_imported_list_written_as_the_site_file_is_used(tmp_path):
    site = tmp_path / "sub" / "relays.toml"
    write_relay_file(site, {"apple-private-relay": import_relay_list("apple-private-relay", APPLE_CSV)})
    assert not [p for p in site.parent.iterdir() if p.name != "relays.toml"]  # no temp file left behind
    classifier = NetworkClassifier(NetworkSettings(relay_file=site), shipped=SHIPPED)
    assert classifier.classify("146.75.164.9").group == "apple-private-relay"
    assert classifier.classify("2a02:26f7:b3c0:4000::1").group == "apple-private-relay"


# --- broken files: refused at start-up, old set kept on reload ---

@pytest.mark.parametrize(("content", "says"), [
    ("[[group]\n", "not valid TOML"),
    ('[[group]]\nname = "x"\nnetworks = ["192.0.2.1/24"]\n', "host bits set: did you mean 192.0.2.0/24"),
    ('[[group]]\nname = "x"\nnetworks = ["bogus"]\n', "'bogus' is not a network"),
    ('[[group]]\nnetworks = []\n', "'name' (a string) is required"),
    ('[[group]]\nname = "x"\nnetwork = []\n', "unknown key(s) ['network']"),
    ('groups = 1\n', "unknown key(s) ['groups']"),
    ('[[group]]\nname = "x"\nnetworks = []\n[[group]]\nname = "x"\nnetworks = []\n', "defined twice"),
])
def test_a_broken_site_file_is_refused_at_start_naming_it(tmp_path, content, says):
    site = tmp_path / "relays.toml"
    site.write_text(content)
    with pytest.raises(RelayFileError) as caught:
        NetworkClassifier(NetworkSettings(relay_file=site), shipped=SHIPPED)
    assert str(site) in str(caught.value) and says in str(caught.value)
    assert check_relay_files(NetworkSettings(relay_file=site), SHIPPED) == [str(caught.value)]


def test_a_missing_site_file_is_refused(tmp_path):
    with pytest.raises(RelayFileError, match=r"absent\.toml: cannot read"):
        NetworkClassifier(NetworkSettings(relay_file=tmp_path / "absent.toml"), shipped=SHIPPED)


def test_reload_takes_a_good_file_and_keeps_the_old_set_on_a_broken_one(tmp_path, caplog):
    site = tmp_path / "relays.toml"
    write_relay_file(site, {"ours": ["192.0.2.0/24"]})
    classifier = NetworkClassifier(NetworkSettings(relay_file=site), shipped=SHIPPED)
    assert classifier.reload_if_changed() is False  # nothing changed
    write_relay_file(site, {"ours": ["203.0.113.0/24"]})
    assert classifier.reload_if_changed() is True
    assert classifier.classify("203.0.113.1").group == "ours" and classifier.classify("192.0.2.1").kind is U

    site.write_text('[[group]]\nname = "ours"\nnetworks = ["not-a-network"]\n')
    with caplog.at_level(logging.ERROR, logger="mailwarden.phishhook.networks"):
        assert classifier.reload() is False
    assert classifier.classify("203.0.113.1").group == "ours"  # the old set stays
    assert classifier.classify(pp.MS_OUTLOOK).group == "microsoft-outlook"
    assert "not-a-network" in caplog.records[-1].kv["error"]
    assert classifier.reload_if_changed() is False  # the broken file is not retried until it changes

    site.unlink()
    assert classifier.reload_if_changed() is False and classifier.classify("203.0.113.1").group == "ours"


def test_trusted_networks_are_validated_in_the_settings():
    with pytest.raises(ValidationError, match=r"did you mean 10\.0\.0\.0/8"):
        NetworkSettings(trusted=["10.1.2.3/8"])
    with pytest.raises(ValidationError, match="is not a network"):
        NetworkSettings(trusted=["campus"])
    with pytest.raises(ValidationError, match="extra"):
        NetworkSettings(trusted_networks=[])


# --- speed: Apple's full list is ~200,000 prefixes ---

def test_classify_stays_fast_with_200000_prefixes(tmp_path):
    rng = random.Random(13)
    v4 = {str(ipaddress.ip_network((rng.randrange(0x0B0000, 0x640000) << 8, 24))) for _ in range(150_000)}  # 11-99.x
    v6 = {str(ipaddress.ip_network((rng.getrandbits(48) << 80, 48))) for _ in range(50_000)}
    site = tmp_path / "relays.toml"
    write_relay_file(site, {"apple-private-relay": sorted(v4) + sorted(v6)})
    classifier = NetworkClassifier(NetworkSettings(relay_file=site), shipped=SHIPPED)
    assert classifier.networks_count > 195_000
    listed = [n.split("/")[0] for n in list(v4)[:500]]
    probes = [str(ipaddress.ip_address(rng.getrandbits(32))) for _ in range(4000)] + \
        [str(ipaddress.ip_address(rng.getrandbits(128))) for _ in range(1000)] + listed * 10
    started = time.process_time()
    kinds = [classifier.classify(address).kind for address in probes]
    per_call = (time.process_time() - started) / len(probes)
    assert kinds[-1] is R and kinds.count(R) >= len(listed) * 10
    assert per_call < 50e-6, f"{per_call * 1e6:.1f} µs per classify"
