"""Every metric the README lists under "Logs and metrics", scraped from a real policyd's /metrics after a
known set of requests: the same names, types, labels and counts, whatever keeps them inside the daemon."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

from conftest import base_settings
from harness.net import free_port, wait_for
from prometheus_client.parser import text_string_to_metric_families

README = Path(__file__).resolve().parent.parent / "README.md"

# name (as the README spells it) -> type, label names
EXPECTED = {
    "mailwarden_policyd_decisions_total": ("counter", {"check", "action"}),
    "mailwarden_policyd_decision_seconds": ("histogram", set()),
    "mailwarden_policyd_check_seconds": ("histogram", {"check"}),
    "mailwarden_policyd_backend_errors_total": ("counter", {"backend", "check"}),
    "mailwarden_policyd_fail_mode_total": ("counter", {"backend", "mode"}),
    "mailwarden_policyd_answer_timeouts_total": ("counter", set()),
    "mailwarden_policyd_protocol_errors_total": ("counter", {"kind"}),
    "mailwarden_policyd_ratelimit_hits_total": ("counter", {"limit"}),
    "mailwarden_redis_connected": ("gauge", set()),
    "mailwarden_policyd_connections": ("gauge", set()),
    "mailwarden_policyd_connections_refused_total": ("counter", {"reason"}),
    "mailwarden_policyd_connections_evicted_total": ("counter", {"state"}),
}
LIMIT = {"name": "per-client", "key": "client_address", "max": 2, "window": "1h", "action": "reject"}


def readme_metrics() -> set[str]:
    section = README.read_text().split("## Logs and metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^- `(mailwarden_[a-z_]+)", section, re.MULTILINE))


def family_name(name: str, kind: str) -> str:
    """The parser names a counter family without its ``_total``."""
    return name.removesuffix("_total") if kind == "counter" else name


def samples(text: str) -> dict[str, tuple[str, list]]:
    return {family.name: (family.type, family.samples) for family in text_string_to_metric_families(text)}


def value(found: dict, name: str, **labels: str) -> float:
    """The value of one sample (by its own name, e.g. ``..._count``), 0 when not served."""
    return sum(s.value for _, family in found.values() for s in family if s.name == name and s.labels == labels)


def test_expected_table_is_the_readme_list():
    assert readme_metrics() == set(EXPECTED)


def test_every_readme_metric_served_with_type_labels_and_counts(policyd_factory, redis_server):
    port = free_port()
    settings = base_settings(redis_server.url, ratelimit={"limits": [LIMIT]}, check_histograms=True)
    settings["metrics"] = {"listen": f"127.0.0.1:{port}"}
    daemon = policyd_factory(settings)
    answers = []
    with daemon.connect() as client:
        # client .10: two messages within its limit (greylisted: new triplets), then two over it
        for n in range(4):
            answers.append(client.ask(sender=f"s{n}@example.org", instance=f"i10.{n}"))
        # another network: two new triplets greylisted, the third over the limit
        for n in range(3):
            answers.append(client.ask(client_address="198.51.100.7", sender=f"t{n}@example.org",
                                      instance=f"i11.{n}"))
    assert [a.split(" ", 1)[0] for a in answers] == ["DEFER_IF_PERMIT"] * 2 + ["550"] * 2 + [
        "DEFER_IF_PERMIT"] * 2 + ["550"]
    with daemon.connect() as bad:
        bad.send_raw(b"no equals sign here\n\n")
        assert bad.read_answer() is None

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()

    def settled() -> str | None:
        text = scrape()
        found = samples(text)
        done = (value(found, "mailwarden_policyd_decision_seconds_count") == 7
                and found.get("mailwarden_policyd_protocol_errors", ("", []))[1]
                and value(found, "mailwarden_policyd_connections") == 0)
        return text if done else None

    found = samples(wait_for(settled, 10, what="metrics after 7 requests"))
    for name, (kind, labels) in EXPECTED.items():
        family = family_name(name, kind)
        assert family in found, f"{name} not served"
        assert found[family][0] == kind, f"{name} is a {found[family][0]}, not a {kind}"
        for sample in found[family][1]:
            assert set(sample.labels) - {"le"} == labels, (name, sample)

    decisions = "mailwarden_policyd_decisions_total"
    assert value(found, decisions, check="greylist", action="defer") == 4
    assert value(found, decisions, check="ratelimit", action="reject") == 3
    assert sum(s.value for s in found["mailwarden_policyd_decisions"][1] if s.name == decisions) == 7
    assert value(found, "mailwarden_policyd_ratelimit_hits_total", limit="per-client") == 3

    latency = "mailwarden_policyd_decision_seconds"
    assert value(found, f"{latency}_count") == 7
    assert value(found, f"{latency}_bucket", le="+Inf") == 7
    assert 0 < value(found, f"{latency}_sum") < 7 * 2.5
    buckets = [s for s in found[latency][1] if s.name == f"{latency}_bucket"]
    assert [s.labels["le"] for s in buckets] == [
        "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "+Inf"]
    assert [s.value for s in buckets] == sorted(s.value for s in buckets)  # cumulative

    # every check ran for the 4 greylisted requests; greylist did not run after the 3 rate-limit rejects
    checks = "mailwarden_policyd_check_seconds"
    for check, runs in {"access": 7, "blocklist": 7, "ratelimit": 7, "greylist": 4}.items():
        assert value(found, f"{checks}_count", check=check) == runs, check
        assert value(found, f"{checks}_bucket", check=check, le="+Inf") == runs, check
        assert value(found, f"{checks}_bucket", check=check, le="0.0001") <= runs
    assert value(found, "mailwarden_policyd_protocol_errors_total", kind="missing") + value(
        found, "mailwarden_policyd_protocol_errors_total", kind="malformed") <= 1
    assert sum(s.value for s in found["mailwarden_policyd_protocol_errors"][1]
               if s.name == "mailwarden_policyd_protocol_errors_total") == 1
    assert value(found, "mailwarden_redis_connected") == 1
    assert value(found, "mailwarden_policyd_connections") == 0
    for empty in ("backend_errors", "fail_mode", "connections_refused", "connections_evicted"):
        assert not [s for s in found[f"mailwarden_policyd_{empty}"][1] if s.name.endswith("_total")], empty
    assert value(found, "mailwarden_policyd_answer_timeouts_total") == 0


def test_check_histograms_are_off_by_default_and_the_family_still_served(policyd_factory, redis_server):
    """Issue 14: one histogram observation per request on the hot path unless ``check_histograms`` is set;
    the per-check family is still served (empty), every request still in decision_seconds."""
    port = free_port()
    settings = base_settings(redis_server.url)
    settings["metrics"] = {"listen": f"127.0.0.1:{port}"}
    daemon = policyd_factory(settings)
    with daemon.connect() as client:
        assert client.ask(sender="s@example.org").startswith("DEFER_IF_PERMIT")

    def settled() -> dict | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            found = samples(response.read().decode())
        return found if value(found, "mailwarden_policyd_decision_seconds_count") == 1 else None

    found = wait_for(settled, 10, what="metrics after 1 request")
    kind, served = found["mailwarden_policyd_check_seconds"]
    assert (kind, served) == ("histogram", [])
