"""phishhook's speed: login events through the detector, Dovecot auth policy requests through the service, and
the phish milter's added latency per message beside the other milters, through a real Postfix.

Three parts, each selectable (``--detector``, ``--auth-policy``, ``--milter``; none given: all three):

1. **detector**: ``Detector.login`` and ``Detector.failed_login`` called directly, in this process, on a detector
   built by ``phishhook.app.build_detector`` from a config file (its own redis-server, a SQLite quarantine migrated
   with ``mailwarden quarantine migrate``, the full GeoLite2 City database of the test dependency
   ``maxminddb-geolite2``, learning_period 0, the default actions: block the account and the address), by one
   thread and by N threads. Per run: events/s, CPU µs per event (``time.process_time`` of this process, all
   threads), Redis's CPU per event, p50/p99 per call, and the snags raised, each checked against the stream.
2. **auth-policy**: a real ``mailwarden phish serve`` (uvicorn; Dovecot's api_header set, geo on) driven by C
   persistent HTTP/1.1 keep-alive connections, one request outstanding on each as Dovecot's auth process does,
   with the requests Dovecot 2.3 sends (../shared/RECIPES.md section 3): a successful login is ``allow``,
   ``allow`` (after authentication), ``report`` with ``success: true``; a failed one ``allow``, ``report`` with
   ``success: false``. Every answer is checked (HTTP 200, the JSON status the stream expects: ``-1`` for the
   login after an account's snag, ``0`` otherwise). Per run: requests/s, logins/s, p50/p90/p99 overall and per
   command, the server's CPU µs per request and its peak RSS (/proc), Redis's CPU, and the client's own CPU, so
   a reader sees whether the server was the limit. The client is asyncio Protocol callbacks on uvloop with every
   request encoded before the clock starts.
3. **milter**: a private Postfix per target (the harness's ``PostfixInstance`` with ``milters=``) relaying to
   Postfix's ``smtp-sink``: ``no-milter``; ``phish`` (``mailwarden milter phish``); ``clamav``
   (``mailwarden milter clamav`` with checks ["banned", "clamav"] and a private clamd); optionally
   ``spamassassin`` (``mailwarden milter spamassassin`` and a private spamd: slow, off by default). Load: a pool
   of client threads, one SMTP session per message: EHLO, ``XCLIENT ADDR=<a real located address> LOGIN=userN``
   (smtp-source cannot), EHLO, MAIL, three RCPTs, a 10 KB plain-text message; the client times each message
   from connect to the 250 after DATA. Per run: messages/s, p50/p99 per message, the milter's CPU per message
   and peak RSS, clamd's (spamd's) CPU; per target the added latency = its p50/p99 minus no-milter's.

**The logins** are real addresses placed by the full GeoLite2 City database (2018-07-03): random public IPv4
addresses looked up once (seeded, so every run of the benchmark uses the same ones), kept when the database
gives a city with an accuracy radius of 50 km or less. Each user has a home of 2-3 addresses in one record
network of the database (one place), and logs in 3-12 times over a simulated week (part 1) from them; 5% of
the logins come from a relay network (Microsoft's Outlook ranges, Apple Private Relay: recorded, never compared),
6% are preceded by a failed login (a typo) from the same address; 3% of the users travel impossibly (a login
2,000+ km away less than 2 hours after their last home login: a snag), 2% travel plausibly (part 1 only:
slower than 500 km/h, no snag); in part 2 a snagged user tries once more from home and must be refused.
Travel destinations are in places where fewer than 10 users live, one traveller each, so no place of the
organisation (25 users) exempts them. Every run gets new user names and an emptied Redis (``FLUSHALL``), so
each run sees the same history from nothing.

Runs go in passes as in milter_bench.py: one discarded warm-up pass (a fifth of the load), then ``--runs`` passes,
the order reversed on every other pass (ABBA); the tables show medians. No pass/fail on a wall-clock figure:
the script exits 1 only on lost, deferred or refused mail, or answers or snags other than the stream expects.

Run as root (Postfix needs it):  /path/to/venv/bin/python bench/phish_bench.py --help
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import datetime
import functools
import gc
import ipaddress
import json
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))  # the harness: tests/harness/*
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this checkout's packages, before any installed copy

from chain_bench import BenchSpamd, ham_message  # noqa: E402
from harness.phishhook_proc import PhishhookProcess  # noqa: E402
from harness.policyd_proc import render_toml  # noqa: E402
from harness.postfix import PostfixInstance  # noqa: E402
from milter_bench import (  # noqa: E402
    PROBLEM,
    SENT,
    SMTP_SINK,
    BenchError,
    Load,
    busy_seconds,
    human_size,
    parse_load,
    progress,
    quarantine_settings,
    read_from,
    reset_peak,
    run_in_workdir,
    run_passes,
    start_common,
    start_milter,
    start_ours,
    start_postfix,
)
from policyd_bench import (  # noqa: E402
    new_event_loop,
    percentile,
    redis_command,
    render_table,
    run_bounded,
    self_cpu_seconds,
    start_redis,
)
from procstat import cpu_seconds, group_cpu_seconds, load_average, memory_mib  # noqa: E402

PREFIX = "phb:"
API_HEADER = "X-API-Key: bench-key-7f3a91"
DOMAIN = "example.org"
WEEK = 7 * 86400

# kinds of login in a stream
HOME = "home"
RELAY = "relay"
TYPO = "typo"
"""A failed login (wrong password), just before the same user's successful one from the same address."""
TRAVEL_SNAG = "travel-snag"
TRAVEL_OK = "travel-ok"
AFTER_SNAG = "after-snag"
"""A snagged user's next login from home (part 2): Dovecot's allow must refuse it."""

RELAY_SAMPLES = ("40.107.0.0/16", "52.96.0.0/14", "172.224.0.0/12", "104.28.0.0/16")
"""Where relay addresses are drawn from: Exchange Online and Apple Private Relay ranges of the shipped relay
groups (rules/phishhook/relays.toml); each address drawn is checked to classify as a relay."""


# -- real located addresses ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Located:
    address: str
    label: str
    """country|city, the key of a place in the login history."""
    latitude: float
    longitude: float
    radius_km: float


@dataclass(frozen=True)
class Home:
    addresses: tuple[str, ...]
    """2-3 addresses in one record network of the database: one place."""
    where: Located


@dataclass
class AddressPool:
    homes: list[Home]
    far: list[Located]
    """Single located addresses for travel destinations."""
    relays: list[str]


def build_pool(database: Path, homes: int, far: int, seed: int) -> AddressPool:
    """Random public IPv4 addresses that the City database places in a city within 50 km; ``homes`` of them
    with 1-2 neighbours in the same record network (same place), ``far`` more as single addresses."""
    import maxminddb

    from phishhook.geo import GeoLocator, GeoSettings
    from phishhook.networks import AddressClass, NetworkClassifier, NetworkSettings

    locator = GeoLocator.open(GeoSettings(city_database=database))
    reader = maxminddb.open_database(str(database))
    classifier = NetworkClassifier(NetworkSettings())
    rng = random.Random(seed)
    found_homes: list[Home] = []
    found_far: list[Located] = []
    networks: set[str] = set()

    def located(address: str) -> Located | None:
        if classifier.classify(address).kind is not AddressClass.PUBLIC:
            return None
        place = locator.locate(address)
        if place is None or not place.city or place.latitude is None or place.longitude is None \
                or place.radius_km > 50:
            return None
        return Located(address, f"{place.country}|{place.city}", place.latitude, place.longitude, place.radius_km)

    tries = 0
    while len(found_homes) < homes or len(found_far) < far:
        tries += 1
        if tries > 100 * (homes + far) + 100_000:
            raise BenchError("could not find enough located addresses in the City database")
        ip = ipaddress.IPv4Address(rng.getrandbits(32))
        if not ip.is_global:
            continue
        first = located(str(ip))
        if first is None:
            continue
        _record, prefix = reader.get_with_prefix_len(str(ip))
        network = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
        if str(network) in networks:
            continue
        networks.add(str(network))
        if len(found_homes) >= homes or network.num_addresses < 16:
            if len(found_far) < far:
                found_far.append(first)
            continue
        neighbours = [first]
        wanted = 1 + rng.randint(1, 2)
        for _ in range(8):
            if len(neighbours) == wanted:
                break
            other = str(network.network_address + rng.randrange(1, network.num_addresses - 1))
            near = located(other)
            if near is not None and other not in {n.address for n in neighbours} \
                    and (near.latitude, near.longitude) == (first.latitude, first.longitude):
                neighbours.append(near)
        if len(neighbours) >= 2:
            found_homes.append(Home(tuple(n.address for n in neighbours), first))
    reader.close()
    relays: list[str] = []
    for net_text in RELAY_SAMPLES:
        net = ipaddress.ip_network(net_text)
        for _ in range(4):
            address = str(net.network_address + rng.randrange(1, net.num_addresses - 1))
            if classifier.classify(address).kind is AddressClass.RELAY:
                relays.append(address)
    locator.close()
    if not relays:
        raise BenchError("no relay address classified as a relay: has rules/phishhook/relays.toml changed?")
    return AddressPool(found_homes, found_far, relays)


def separation_km(a: Located, b: Located) -> float:
    from phishhook.geo import Place
    from phishhook.geo import separation_km as between

    return between(Place(latitude=a.latitude, longitude=a.longitude, radius_km=a.radius_km),
                   Place(latitude=b.latitude, longitude=b.longitude, radius_km=b.radius_km))


# -- the login stream ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Login:
    user: int
    """The user's number within the stream (its name is given per run)."""
    address: str
    success: bool
    at: float
    """Simulated seconds from the start of the stream's week."""
    kind: str
    service: str = "imap"


@dataclass
class Stream:
    logins: list[Login]
    """In simulated time order."""
    users: int

    def count(self, kind: str) -> int:
        return sum(login.kind == kind for login in self.logins)


def make_stream(pool: AddressPool, events: int, seed: int, plausible_travel: bool, after_snag: bool) -> Stream:
    """About ``events`` logins (successful and failed) of as many users as that takes (see the module's doc)."""
    rng = random.Random(seed)
    logins: list[Login] = []
    destinations = iter(pool.far)
    homes_at: dict[str, int] = {}
    for home in pool.homes:
        homes_at[home.where.label] = homes_at.get(home.where.label, 0) + 1
    used_labels: set[str] = set()
    user = 0
    while len(logins) < events:
        if user >= len(pool.homes):
            raise BenchError(f"the address pool has {len(pool.homes)} homes: too few for {events} events")
        home = pool.homes[user]
        times = sorted(rng.uniform(0, WEEK) for _ in range(rng.randint(3, 12)))
        last_home = None
        for at in times:
            service = "smtp" if rng.random() < 0.2 else "imap"
            if rng.random() < 0.05:
                logins.append(Login(user, rng.choice(pool.relays), True, at, RELAY, service))
                continue
            last_home = at
            address = home.addresses[0] if rng.random() < 0.6 else rng.choice(home.addresses)
            if rng.random() < 0.06:
                logins.append(Login(user, address, False, at - 5, TYPO, service))
            logins.append(Login(user, address, True, at, HOME, service))
        roll = rng.random()
        travel = TRAVEL_SNAG if roll < 0.03 else TRAVEL_OK if plausible_travel and roll < 0.05 else ""
        if travel and last_home is not None:  # judged against the last home login (relays are never compared)
            for destination in destinations:
                # fewer than 10 homes there and no other traveller: never an organisation's usual place (25)
                if (homes_at.get(destination.label, 0) < 10 and destination.label not in used_labels
                        and separation_km(home.where, destination) > 2000):
                    break
            else:
                raise BenchError("the address pool has too few travel destinations")
            used_labels.add(destination.label)
            km = separation_km(home.where, destination)
            hours = rng.uniform(0.2, 2.0) if travel == TRAVEL_SNAG else km / 500 + 1
            at = last_home + hours * 3600
            logins.append(Login(user, destination.address, True, at, travel))
            if travel == TRAVEL_SNAG and after_snag:
                logins.append(Login(user, home.addresses[0], True, at + 300, AFTER_SNAG))
        user += 1
    logins.sort(key=lambda login: login.at)
    return Stream(logins, user)


class UserNames:
    """New user names for every run (the snag store keeps each user's open snag across runs)."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, count: int) -> list[str]:
        start, self.next = self.next, self.next + count
        return [f"user{n}@{DOMAIN}" for n in range(start, self.next)]


def split(logins: Sequence[Login], parts: int) -> list[list[int]]:
    """Indexes of ``logins`` per part, each user's logins all in one part (in order), users dealt round."""
    out: list[list[int]] = [[] for _ in range(parts)]
    for index, login in enumerate(logins):
        out[login.user % parts].append(index)
    return [part for part in out if part]


# -- shared set-up ---------------------------------------------------------------------------------------


def city_database() -> Path:
    from _maxminddb_geolite2 import geolite2_database

    return Path(geolite2_database())


def phishhook_settings(base: Path, redis_port: int) -> dict[str, Any]:
    return {
        "redis": {"url": f"redis://127.0.0.1:{redis_port}/0", "key_prefix": PREFIX},
        "quarantine": quarantine_settings(base),
        "logging": {"level": "info"},
        "phishhook": {"geo": {"city_database": str(city_database())}, "history": {"learning_period": "0s"},
                      "dovecot": {"api_header": API_HEADER}},
    }


def migrate(config: Path) -> None:
    subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config), "quarantine", "migrate"],
                   check=True, capture_output=True, timeout=120)


def flush(redis_port: int) -> None:
    reply = redis_command(redis_port, b"FLUSHALL")
    if reply != b"+OK":
        raise BenchError(f"FLUSHALL answered {reply!r}")


def timed_label(index: int, runs: int) -> str:
    return "warm-up" if index == 0 else f"run {index}/{runs}"


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- part 1: the detector in this process ----------------------------------------------------------------


@dataclass
class DetectorRun:
    threads: int
    index: int
    events: int
    logins: int
    failed: int
    wall_s: float
    events_per_s: float
    cpu_us: float
    """This process's CPU (all threads) per event."""
    redis_cpu_us: float
    p50_us: float
    p99_us: float
    login_p50_us: float
    login_p99_us: float
    failed_p50_us: float
    failed_p99_us: float
    snags: int
    expected_snags: int
    unexpected: int
    """Events whose outcome differs from the stream's: a snag where none was due, none where one was."""
    examples: list[str] = field(default_factory=list)


def run_detector_once(detector: Any, stream: Stream, names: list[str], threads: int, index: int,
                      redis_pid: int, timeout: float) -> DetectorRun:
    from phishhook.events import LoginEvent

    base = time.time() - WEEK - 86400
    events = [LoginEvent(user=names[login.user], address=login.address, at=base + login.at, success=login.success,
                         service=login.service, via="dovecot", session=f"s{i:x}")
              for i, login in enumerate(stream.logins)]
    parts = split(stream.logins, threads)
    took = [0.0] * len(events)
    snagged = [False] * len(events)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(parts) + 1)
    stop = threading.Event()

    def work(indexes: list[int]) -> None:
        try:
            barrier.wait(timeout)
            clock = time.perf_counter
            login, failed = detector.login, detector.failed_login
            for i in indexes:
                if stop.is_set():
                    return
                event = events[i]
                started = clock()
                if event.success:
                    snagged[i] = login(event).snag is not None
                else:
                    failed(event)
                took[i] = clock() - started
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(part,), daemon=True) for part in parts]
    for worker in workers:
        worker.start()
    gc.collect()
    cpu0, redis0 = time.process_time(), cpu_seconds(redis_pid)
    try:
        barrier.wait(timeout)
        started = time.perf_counter()
        for worker in workers:
            worker.join(timeout)
            if worker.is_alive():
                raise BenchError(f"detector run not done after {timeout:g}s")
        wall = time.perf_counter() - started
    finally:  # interrupted or failed: no thread may go on using the detector while it is closed
        stop.set()
        barrier.abort()
        for worker in workers:
            worker.join(30)
    cpu, redis_cpu = time.process_time() - cpu0, cpu_seconds(redis_pid) - redis0
    if errors:
        raise BenchError(f"the detector raised {errors[0]!r}")
    n = len(events)
    unexpected, examples = 0, list[str]()
    for i, login in enumerate(stream.logins):
        if login.success and snagged[i] != (login.kind == TRAVEL_SNAG):
            unexpected += 1
            if len(examples) < 5:
                examples.append(f"{login.kind} {names[login.user]} from {login.address}: "
                                f"{'snag' if snagged[i] else 'no snag'}")
    every = sorted(took)
    logins = sorted(t for t, login in zip(took, stream.logins, strict=True) if login.success)
    failed = sorted(t for t, login in zip(took, stream.logins, strict=True) if not login.success)
    return DetectorRun(threads, index, n, len(logins), len(failed), wall, n / wall, cpu / n * 1e6,
                       redis_cpu / n * 1e6, percentile(every, 0.5) * 1e6, percentile(every, 0.99) * 1e6,
                       percentile(logins, 0.5) * 1e6, percentile(logins, 0.99) * 1e6,
                       percentile(failed, 0.5) * 1e6, percentile(failed, 0.99) * 1e6,
                       sum(snagged), stream.count(TRAVEL_SNAG), unexpected, examples)


@dataclass
class DetectorRow:
    threads: int
    runs: int
    events: int
    events_per_s: float
    cpu_us: float
    redis_cpu_us: float
    p50_us: float
    p99_us: float
    login_p50_us: float
    login_p99_us: float
    failed_p50_us: float
    failed_p99_us: float
    snags: int
    expected_snags: int
    unexpected_answers: int


def summarise_detector(results: list[DetectorRun]) -> list[DetectorRow]:
    rows = []
    for threads in sorted({r.threads for r in results}):
        rs = [r for r in results if r.threads == threads and r.index > 0]
        if not rs:
            continue
        rows.append(DetectorRow(
            threads, len(rs), rs[0].events, med([r.events_per_s for r in rs]), med([r.cpu_us for r in rs]),
            med([r.redis_cpu_us for r in rs]), med([r.p50_us for r in rs]), med([r.p99_us for r in rs]),
            med([r.login_p50_us for r in rs]), med([r.login_p99_us for r in rs]),
            med([r.failed_p50_us for r in rs]), med([r.failed_p99_us for r in rs]),
            rs[0].snags, rs[0].expected_snags, sum(r.unexpected for r in rs)))
    return rows


DETECTOR_COLUMNS: list[tuple[str, str, Callable[[Any], object]]] = [
    ("threads", ">7", lambda r: r.threads),
    ("events", ">6", lambda r: r.events),
    ("events/s", ">8,.0f", lambda r: r.events_per_s),
    ("CPU µs/ev", ">9.0f", lambda r: r.cpu_us),
    ("+redis µs", ">9.0f", lambda r: r.redis_cpu_us),
    ("p50 µs", ">6.0f", lambda r: r.p50_us),
    ("p99 µs", ">6.0f", lambda r: r.p99_us),
    ("login p50", ">9.0f", lambda r: r.login_p50_us),
    ("login p99", ">9.0f", lambda r: r.login_p99_us),
    ("failed p50", ">10.0f", lambda r: r.failed_p50_us),
    ("failed p99", ">10.0f", lambda r: r.failed_p99_us),
    ("snags", ">5", lambda r: r.snags),
    ("due", ">3", lambda r: r.expected_snags),
    ("bad", ">3", lambda r: r.unexpected_answers),
]


def run_detector(args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack, pool: AddressPool,
                 problems: list[str]) -> dict[str, Any]:
    from mailwarden.config import load_config
    from mailwarden.logs import setup_logging
    from phishhook.app import build_detector

    base = workdir / "detector"
    redis, redis_port = start_redis(workdir, stack, "detector-redis")
    config_path = base / "phishhook.toml"
    config_path.write_text(render_toml(phishhook_settings(base, redis_port)))
    migrate(config_path)
    config = load_config(config_path)
    log_file = (base / "decisions.log").open("a")
    stack.callback(log_file.close)
    decisions = setup_logging(config.section("logging"), stream=log_file)
    detector = build_detector(config, decisions)
    stack.callback(detector.close)
    stream = make_stream(pool, args.events, args.seed, plausible_travel=True, after_snag=False)
    warm = make_stream(pool, max(100, args.events // 5), args.seed + 1, plausible_travel=True, after_snag=False)
    progress(f"detector: {len(stream.logins):,} events of {stream.users:,} users per run "
             f"({stream.count(TYPO)} failed, {stream.count(RELAY)} relay, {stream.count(TRAVEL_SNAG)} impossible "
             f"and {stream.count(TRAVEL_OK)} plausible travels); threads {args.threads}")
    names = UserNames()
    results: list[DetectorRun] = []

    def one(label: str, _load: Load, index: int, _messages: int) -> None:
        threads = int(label)
        which = warm if index == 0 else stream
        flush(redis_port)
        result = run_detector_once(detector, which, names.take(which.users), threads, index, redis.pid,
                                   args.timeout)
        results.append(result)
        progress(f"detector  {timed_label(index, args.runs):9} threads {threads:<3} {result.events_per_s:8,.0f} "
                 f"events/s  cpu {result.cpu_us:4.0f}+{result.redis_cpu_us:3.0f} µs/event (+redis)  p50 "
                 f"{result.p50_us:5.0f} µs  p99 {result.p99_us:6.0f} µs  snags {result.snags}/{result.expected_snags}"
                 + (f"  UNEXPECTED {result.unexpected}: {result.examples[:2]}" if result.unexpected else ""))
        if result.unexpected:
            problems.append(f"detector, {threads} threads, {timed_label(index, args.runs)}: {result.unexpected} "
                            f"events judged otherwise than the stream expects: {result.examples}")

    run_passes([str(t) for t in args.threads], [Load(0, 1, len(stream.logins))], args.runs, one)
    rows = summarise_detector(results)
    return {"summary": [asdict(r) for r in rows], "runs": [asdict(r) for r in results],
            "stream": {"events": len(stream.logins), "users": stream.users,
                       **{kind: stream.count(kind) for kind in (HOME, RELAY, TYPO, TRAVEL_SNAG, TRAVEL_OK)}},
            "table": render_table(rows, DETECTOR_COLUMNS)}


# -- part 2: Dovecot's auth policy requests through `mailwarden phish serve` -----------------------------

ALLOW = "allow"
REPORT_OK = "report ok"
REPORT_FAILED = "report failed"
COMMANDS = (ALLOW, REPORT_OK, REPORT_FAILED)


@dataclass
class Requests:
    """A run's requests, encoded, with what each must get back."""

    payloads: list[bytes]
    commands: list[str]
    expected: list[int]
    """The JSON status each must answer: 0, or -1 (a snagged account's next login)."""
    per_connection: list[list[int]]
    logins: int


def encode_request(command: str, body: dict[str, Any], port: int) -> bytes:
    """One POST as Dovecot 2.3's HTTP client sends it to auth_policy_server_url (keep-alive, the configured
    api header verbatim, compact JSON)."""
    data = json.dumps(body, separators=(",", ":")).encode()
    head = (f"POST /policy?command={command} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: Keep-Alive\r\n"
            f"Content-Type: application/json\r\n{API_HEADER}\r\nContent-Length: {len(data)}\r\n\r\n")
    return head.encode() + data


def dovecot_requests(stream: Stream, names: list[str], port: int, connections: int) -> Requests:
    """Each login of the stream as the requests Dovecot sends for it (RECIPES.md section 3)."""
    payloads: list[bytes] = []
    commands: list[str] = []
    expected: list[int] = []
    by_login: list[list[int]] = []
    for number, login in enumerate(stream.logins):
        body: dict[str, Any] = {
            "device_id": "", "local": "127.0.0.1", "local_port": "143", "login": names[login.user],
            "protocol": login.service if login.service != "smtp" else "imap",
            "pwhash": "0afd" if login.success else "04ac", "real_remote": "127.0.0.1", "remote": login.address,
            "remote_port": str(1024 + number % 60000), "session_id": f"bench{number:08x}", "tls": False}
        steps: list[tuple[str, str, dict[str, Any], int]]
        if login.kind == AFTER_SNAG:  # refused at allow: Dovecot reports the failure with policy_reject
            steps = [("allow", ALLOW, body, -1),
                     ("report", REPORT_FAILED, {**body, "success": False, "policy_reject": True}, 0)]
        elif login.success:
            steps = [("allow", ALLOW, body, 0), ("allow", ALLOW, body, 0),
                     ("report", REPORT_OK, {**body, "success": True, "policy_reject": False}, 0)]
        else:
            steps = [("allow", ALLOW, body, 0),
                     ("report", REPORT_FAILED, {**body, "success": False, "policy_reject": False}, 0)]
        indexes = []
        for command, label, request, status in steps:
            indexes.append(len(payloads))
            payloads.append(encode_request(command, request, port))
            commands.append(label)
            expected.append(status)
        by_login.append(indexes)
    per_connection = [[i for login_index in part for i in by_login[login_index]]
                      for part in split(stream.logins, connections)]
    return Requests(payloads, commands, expected, per_connection, len(stream.logins))


class _Shared:
    __slots__ = ("active", "answers", "done", "latencies", "payloads", "statuses")

    def __init__(self, payloads: list[bytes], done: asyncio.Future[None]) -> None:
        self.payloads = payloads
        self.latencies = [0.0] * len(payloads)
        self.statuses = [0] * len(payloads)
        """The HTTP status of each answer (0: none yet)."""
        self.answers: list[bytes] = [b""] * len(payloads)
        self.active = 0
        self.done = done

    def fail(self, why: str) -> None:
        if not self.done.done():
            self.done.set_exception(BenchError(why))


CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")


class _HttpConnection(asyncio.Protocol):
    """One keep-alive connection working through its own requests (a user's requests are all on one
    connection, in order), one outstanding at a time, as Dovecot's auth process sends them."""

    __slots__ = ("buf", "finished", "next", "order", "sent", "shared", "transport")

    def __init__(self, shared: _Shared, order: list[int]) -> None:
        self.shared = shared
        self.order = order
        self.next = 0
        self.buf = b""
        self.sent = 0.0
        self.finished = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def start(self) -> None:
        self.shared.active += 1
        self._send_next()

    def _send_next(self) -> None:
        if self.next >= len(self.order):
            self.finished = True
            self.shared.active -= 1
            if self.shared.active == 0 and not self.shared.done.done():
                self.shared.done.set_result(None)
            return
        assert self.transport is not None
        self.sent = time.perf_counter()
        self.transport.write(self.shared.payloads[self.order[self.next]])

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self.buf = buf
            return
        head = buf[:end]
        match = CONTENT_LENGTH.search(head)
        length = int(match.group(1)) if match else 0
        if len(buf) < end + 4 + length:
            self.buf = buf
            return
        self.buf = b""
        shared = self.shared
        index = self.order[self.next]
        shared.latencies[index] = time.perf_counter() - self.sent
        shared.statuses[index] = int(head[9:12])
        shared.answers[index] = buf[end + 4:end + 4 + length]
        self.next += 1
        self._send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished:
            self.shared.fail(f"the server closed a connection ({exc})")


@dataclass
class HttpResult:
    wall: float
    """From the first request to the last answer."""
    latencies: list[float]
    statuses: list[int]
    answers: list[bytes]


async def drive_http(port: int, requests: Requests, timeout: float) -> HttpResult:
    """Every request over its connection, each connection working through its own list."""
    loop = asyncio.get_running_loop()
    shared = _Shared(requests.payloads, loop.create_future())
    conns: list[_HttpConnection] = []
    try:
        for order in requests.per_connection:
            _transport, conn = await asyncio.wait_for(
                loop.create_connection(lambda order=order: _HttpConnection(shared, order),  # type: ignore[misc]
                                       "127.0.0.1", port), 10)
            conns.append(conn)
        started = time.perf_counter()
        for conn in conns:
            conn.start()
        try:
            await asyncio.wait_for(asyncio.shield(shared.done), timeout)
        except TimeoutError:
            done = sum(1 for s in shared.statuses if s)
            raise BenchError(f"auth policy run timed out after {timeout:g}s with {done} of "
                             f"{len(requests.payloads)} answers") from None
        wall = time.perf_counter() - started
    finally:
        for conn in conns:
            conn.finished = True
            if conn.transport is not None:
                conn.transport.close()
        if not shared.done.done():
            shared.done.cancel()
    return HttpResult(wall, shared.latencies, shared.statuses, shared.answers)


@dataclass
class PolicyRun:
    connections: int
    index: int
    requests: int
    logins: int
    wall_s: float
    requests_per_s: float
    logins_per_s: float
    latency_ms: dict[str, float]
    """p50, p90, p99 of every request."""
    per_command_ms: dict[str, dict[str, float]]
    server_cpu_us: float
    redis_cpu_us: float
    client_cpu_pct: float
    client_cpu_us: float
    busy_pct: float
    """The whole machine's busy CPU during the run, in % of all its cores."""
    hwm_mb: float
    rss_mb: float
    snags: int
    wrong: int
    examples: list[str] = field(default_factory=list)


def latency_ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {p: percentile(ordered, q) * 1000 for p, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}


def check_answers(requests: Requests, result: HttpResult) -> tuple[int, list[str]]:
    """Each answer against the stream's: HTTP 200 and the expected JSON status."""
    wrong, examples = 0, list[str]()
    for i, (status, answer, expected) in enumerate(zip(result.statuses, result.answers, requests.expected,
                                                       strict=True)):
        try:
            ok = status == 200 and json.loads(answer).get("status") == expected
        except ValueError:
            ok = False
        if not ok:
            wrong += 1
            if len(examples) < 5:
                body = requests.payloads[i].partition(b"\r\n\r\n")[2]
                examples.append(f"{requests.commands[i]} {body.decode(errors='replace')} "
                                f"-> HTTP {status} {answer[:200].decode(errors='replace')} "
                                f"(expected status {expected})")
    return wrong, examples


def run_policy_once(server_pid: int, redis_pid: int, port: int, requests: Requests, connections: int, index: int,
                    loop: asyncio.AbstractEventLoop, timeout: float) -> PolicyRun:
    reset_peak(server_pid)
    gc.collect()
    gc.disable()
    try:
        server0, redis0, client0, busy0 = (cpu_seconds(server_pid), cpu_seconds(redis_pid), self_cpu_seconds(),
                                           busy_seconds())
        result = run_bounded(loop, drive_http(port, requests, timeout))
        server, redis_cpu, client, busy = (cpu_seconds(server_pid) - server0, cpu_seconds(redis_pid) - redis0,
                                           self_cpu_seconds() - client0, busy_seconds() - busy0)
    finally:
        gc.enable()
    n, wall = len(requests.payloads), result.wall
    wrong, examples = check_answers(requests, result)
    rss, hwm = memory_mib(server_pid)
    per_command = {command: latency_ms([t for t, c in zip(result.latencies, requests.commands, strict=True)
                                        if c == command]) for command in COMMANDS}
    return PolicyRun(connections, index, n, requests.logins, wall, n / wall, requests.logins / wall,
                     latency_ms(result.latencies), per_command, server / n * 1e6, redis_cpu / n * 1e6,
                     client / wall * 100, client / n * 1e6, busy / wall / (os.cpu_count() or 1) * 100, hwm, rss,
                     sum(e == -1 for e in requests.expected), wrong, examples)


@dataclass
class PolicyRow:
    connections: int
    runs: int
    requests: int
    requests_per_s: float
    logins_per_s: float
    latency_ms: dict[str, float]
    per_command_ms: dict[str, dict[str, float]]
    server_cpu_us: float
    redis_cpu_us: float
    client_cpu_pct: float
    client_cpu_us: float
    busy_pct: float
    hwm_mb: float
    unexpected_answers: int


def summarise_policy(results: list[PolicyRun]) -> list[PolicyRow]:
    rows = []
    for connections in sorted({r.connections for r in results}):
        rs = [r for r in results if r.connections == connections and r.index > 0]
        if not rs:
            continue
        rows.append(PolicyRow(
            connections, len(rs), rs[0].requests, med([r.requests_per_s for r in rs]),
            med([r.logins_per_s for r in rs]),
            {p: med([r.latency_ms[p] for r in rs]) for p in ("p50", "p90", "p99")},
            {c: {p: med([r.per_command_ms[c][p] for r in rs]) for p in ("p50", "p90", "p99")} for c in COMMANDS},
            med([r.server_cpu_us for r in rs]), med([r.redis_cpu_us for r in rs]),
            med([r.client_cpu_pct for r in rs]), med([r.client_cpu_us for r in rs]), med([r.busy_pct for r in rs]),
            max(r.hwm_mb for r in rs), sum(r.wrong for r in rs)))
    return rows


POLICY_COLUMNS: list[tuple[str, str, Callable[[Any], object]]] = [
    ("conns", ">5", lambda r: r.connections),
    ("req/s", ">7,.0f", lambda r: r.requests_per_s),
    ("logins/s", ">8,.0f", lambda r: r.logins_per_s),
    ("p50 ms", ">6.2f", lambda r: r.latency_ms["p50"]),
    ("p90 ms", ">6.2f", lambda r: r.latency_ms["p90"]),
    ("p99 ms", ">6.2f", lambda r: r.latency_ms["p99"]),
    ("allow p99", ">9.2f", lambda r: r.per_command_ms[ALLOW]["p99"]),
    ("report p99", ">10.2f", lambda r: r.per_command_ms[REPORT_OK]["p99"]),
    ("CPU µs/req", ">10.0f", lambda r: r.server_cpu_us),
    ("+redis µs", ">9.0f", lambda r: r.redis_cpu_us),
    ("HWM MB", ">6.1f", lambda r: r.hwm_mb),
    ("client %", ">8.0f", lambda r: r.client_cpu_pct),
    ("client µs", ">9.0f", lambda r: r.client_cpu_us),
    ("busy %", ">6.0f", lambda r: r.busy_pct),
    ("bad", ">3", lambda r: r.unexpected_answers),
]


def render_commands(rows: list[PolicyRow]) -> str:
    head = f"{'conns':>5}  {'command':13} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7}"
    lines = [head, "-" * len(head)]
    for row in rows:
        for command in COMMANDS:
            lat = row.per_command_ms[command]
            lines.append(f"{row.connections:>5}  {command:13} {lat['p50']:7.2f} {lat['p90']:7.2f} {lat['p99']:7.2f}")
    return "\n".join(lines)


def run_auth_policy(args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack, pool: AddressPool,
                    problems: list[str]) -> dict[str, Any]:
    base = workdir / "serve"
    redis, redis_port = start_redis(workdir, stack, "serve-redis")
    server = PhishhookProcess(base, phishhook_settings(base, redis_port))
    migrate(server.write_config())
    stack.callback(server.stop)
    server.start()
    assert server.proc is not None
    server_pid = server.proc.pid
    # about 2.4 requests per login: size the stream to --requests
    stream = make_stream(pool, int(args.requests / 2.4), args.seed + 2, plausible_travel=False, after_snag=True)
    warm = make_stream(pool, max(100, int(args.requests / 12)), args.seed + 3, plausible_travel=False,
                       after_snag=True)
    progress(f"auth policy: {len(stream.logins):,} logins of {stream.users:,} users per run "
             f"({stream.count(TYPO)} failed, {stream.count(RELAY)} relay, {stream.count(TRAVEL_SNAG)} impossible "
             f"travels, each followed by a refused login); connections {args.concurrency}")
    names = UserNames()
    loop = new_event_loop()
    stack.callback(loop.close)
    results: list[PolicyRun] = []

    def one(label: str, _load: Load, index: int, _messages: int) -> None:
        connections = int(label)
        which = warm if index == 0 else stream
        flush(redis_port)
        if server.proc is None or server.proc.poll() is not None:
            raise BenchError(f"mailwarden phish serve exited; log {server.log_path}")
        requests = dovecot_requests(which, names.take(which.users), server.port, connections)
        result = run_policy_once(server_pid, redis.pid, server.port, requests, connections, index, loop,
                                 args.timeout)
        results.append(result)
        lat = result.latency_ms
        progress(f"auth policy {timed_label(index, args.runs):9} conns {connections:<3} {result.requests_per_s:7,.0f} "
                 f"req/s  {result.logins_per_s:6,.0f} logins/s  p50/p90/p99 {lat['p50']:6.2f} {lat['p90']:6.2f} "
                 f"{lat['p99']:6.2f} ms  cpu {result.server_cpu_us:4.0f}+{result.redis_cpu_us:3.0f} µs/req  client "
                 f"{result.client_cpu_pct:3.0f}% {result.client_cpu_us:3.0f} µs/req  busy {result.busy_pct:3.0f}%  "
                 f"HWM {result.hwm_mb:5.1f} MB" + (f"  WRONG {result.wrong}: {result.examples[:1]}"
                                                    if result.wrong else ""))
        if result.wrong:
            problems.append(f"auth policy, {connections} connections, {timed_label(index, args.runs)}: "
                            f"{result.wrong} wrong answers: {result.examples}")

    run_passes([str(c) for c in args.concurrency], [Load(0, 1, 0)], args.runs, one)
    rows = summarise_policy(results)
    return {"summary": [asdict(r) for r in rows], "runs": [asdict(r) for r in results],
            "stream": {"logins": len(stream.logins), "users": stream.users,
                       **{kind: stream.count(kind) for kind in (HOME, RELAY, TYPO, TRAVEL_SNAG, AFTER_SNAG)}},
            "table": render_table(rows, POLICY_COLUMNS) + "\n\n" + render_commands(rows)}


# -- part 3: the milters through Postfix, XCLIENT sessions -----------------------------------------------

NO_MILTER = "no-milter"
PHISH = "phish"
CLAMAV = "clamav"
SPAMASSASSIN = "spamassassin"
MILTER_TARGETS = (NO_MILTER, PHISH, CLAMAV, SPAMASSASSIN)
DEFAULT_MILTER_TARGETS = (NO_MILTER, PHISH, CLAMAV)
DEFAULT_MILTER_LOADS = ("10K:1:300", "10K:10:1000")
"""One session: no queue, the latency a milter adds to one message; ten: a loaded server."""
RECIPIENTS = ("ann@example.test", "ben@example.test", "cat@example.test")


@dataclass(frozen=True)
class Mail:
    login: str
    address: str
    sender: str
    data: bytes
    """The message, CRLF line ends, dot-stuffed, ending with the lone dot."""


def build_mails(pool: AddressPool, users: int, size: int, count: int, seed: int) -> list[Mail]:
    """``count`` sessions of ``users`` users, each from one of its home addresses (sometimes a relay); the same
    ham-like message of about ``size`` bytes from each user (From: the user, as the envelope sender)."""
    rng = random.Random(seed)
    text = ham_message(size).decode()
    body = text.split("\n\n", 1)[1]
    per_user = []
    for n in range(users):
        sender = f"user{n}@{DOMAIN}"
        header = (f"From: User {n} <{sender}>\nTo: {', '.join(RECIPIENTS)}\n"
                  f"Subject: Re: notes from Tuesday's planning meeting\nDate: Tue, 01 Dec 2026 09:14:03 +0000\n"
                  f"Message-ID: <bench.{n}@mail.{DOMAIN}>\nMIME-Version: 1.0\n"
                  "Content-Type: text/plain; charset=us-ascii\nContent-Transfer-Encoding: 7bit\n\n")
        lines = (header + body).split("\n")
        text_crlf = "\r\n".join("." + line if line.startswith(".") else line for line in lines).rstrip("\r\n")
        per_user.append((f"user{n}", sender, (text_crlf + "\r\n.\r\n").encode()))
    mails = []
    for _ in range(count):
        n = rng.randrange(users)
        home = pool.homes[n]
        address = rng.choice(pool.relays) if rng.random() < 0.05 else (
            home.addresses[0] if rng.random() < 0.6 else rng.choice(home.addresses))
        login, sender, data = per_user[n]
        mails.append(Mail(login, address, sender, data))
    return mails


class SmtpError(Exception):
    pass


def _reply(reader: Any, expect: int) -> None:
    while True:
        line = reader.readline()
        if not line:
            raise SmtpError(f"connection closed waiting for {expect}")
        if line[3:4] != b"-":
            break
    if int(line[:3]) != expect:
        raise SmtpError(line.decode(errors="replace").strip())


def send_mail(port: int, mail: Mail, timeout: float) -> float:
    """One SMTP session with XCLIENT; seconds from connect to the 250 after DATA."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        reader = sock.makefile("rb")
        _reply(reader, 220)
        sock.sendall(b"EHLO client.example\r\n")
        _reply(reader, 250)
        sock.sendall(f"XCLIENT ADDR={mail.address} NAME=unknown LOGIN={mail.login}\r\n".encode())
        _reply(reader, 220)
        sock.sendall(b"EHLO client.example\r\n")
        _reply(reader, 250)
        sock.sendall(f"MAIL FROM:<{mail.sender}>\r\n".encode())
        _reply(reader, 250)
        for rcpt in RECIPIENTS:
            sock.sendall(f"RCPT TO:<{rcpt}>\r\n".encode())
            _reply(reader, 250)
        sock.sendall(b"DATA\r\n")
        _reply(reader, 354)
        sock.sendall(mail.data)
        _reply(reader, 250)
        took = time.perf_counter() - started
        sock.sendall(b"QUIT\r\n")
        with contextlib.suppress(SmtpError, OSError):
            _reply(reader, 221)
        reader.close()
    return took


@dataclass
class MilterTarget:
    name: str
    postfix: PostfixInstance
    milter_pid: int | None = None
    helper: Callable[[], float] | None = None
    """CPU seconds so far of the scanner the milter asks (clamd, spamd), if any."""


@dataclass
class MilterRun:
    target: str
    size: int
    sessions: int
    messages: int
    index: int
    wall_s: float
    msgs_per_s: float
    latency_ms: dict[str, float]
    """p50, p90, p99 of connect to the 250 after DATA."""
    milter_cpu_us: float
    helper_cpu_us: float
    client_cpu_us: float
    client_cpu_pct: float
    machine_cpu_us: float
    busy_pct: float
    hwm_mb: float
    rss_mb: float
    problems: dict[str, int] = field(default_factory=dict)


def run_milter_once(target: MilterTarget, mails: list[Mail], sessions: int, index: int, size: int,
                    timeout: float) -> MilterRun:
    pf = target.postfix
    log_offset = pf.maillog.stat().st_size if pf.maillog.exists() else 0
    pid = target.milter_pid
    if pid:
        reset_peak(pid)
    milter0 = cpu_seconds(pid) if pid else 0.0
    helper0 = target.helper() if target.helper else 0.0
    client0, busy0 = self_cpu_seconds(), busy_seconds()
    latencies = [0.0] * len(mails)
    failures: dict[str, int] = {}
    lock = threading.Lock()
    left = iter(range(len(mails)))
    deadline = time.monotonic() + timeout

    def worker() -> None:
        while True:
            with lock:
                i = next(left, None)
            if i is None or time.monotonic() > deadline:
                return
            try:
                latencies[i] = send_mail(pf.smtp_port, mails[i], max(1.0, deadline - time.monotonic()))
            except (SmtpError, OSError) as exc:
                with lock:
                    key = f"refused: {exc}"[:200]
                    failures[key] = failures.get(key, 0) + 1

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(sessions) as executor:
        for future in [executor.submit(worker) for _ in range(sessions)]:
            future.result()
    client_cpu = self_cpu_seconds() - client0
    expected = len(mails) * len(RECIPIENTS) - sum(failures.values()) * len(RECIPIENTS)
    while True:
        text = read_from(pf.maillog, log_offset)
        if len(SENT.findall(text)) >= expected:
            break
        if time.monotonic() > deadline:
            failures["not delivered in time"] = expected - len(SENT.findall(text))
            break
        time.sleep(0.01)
    wall = time.perf_counter() - started
    busy = busy_seconds() - busy0
    for match in PROBLEM.finditer(text):
        key = match.group(0).decode()
        failures[key] = failures.get(key, 0) + 1
    n = len(mails)
    rss, hwm = memory_mib(pid) if pid else (0.0, 0.0)
    return MilterRun(target.name, size, sessions, n, index, wall, n / wall,
                     latency_ms([t for t in latencies if t > 0]),
                     (cpu_seconds(pid) - milter0) / n * 1e6 if pid else 0.0,
                     ((target.helper() - helper0) / n * 1e6) if target.helper else 0.0,
                     client_cpu / n * 1e6, client_cpu / wall * 100, busy / n * 1e6,
                     busy / wall / (os.cpu_count() or 1) * 100, hwm, rss, failures)


@dataclass
class MilterRow:
    target: str
    size: int
    sessions: int
    runs: int
    msgs_per_s: float
    latency_ms: dict[str, float]
    added_ms: dict[str, float] | None
    milter_cpu_us: float
    helper_cpu_us: float
    client_cpu_us: float
    machine_cpu_us: float
    busy_pct: float
    hwm_mb: float
    unexpected_answers: int


def summarise_milters(results: list[MilterRun], targets: Sequence[str]) -> list[MilterRow]:
    rows = []
    for size, sessions in sorted({(r.size, r.sessions) for r in results}):
        group = {t: [r for r in results if (r.size, r.sessions, r.target) == (size, sessions, t) and r.index > 0]
                 for t in targets}
        lat = {t: {p: med([r.latency_ms[p] for r in rs]) for p in ("p50", "p90", "p99")}
               for t, rs in group.items() if rs}
        for t, rs in group.items():
            if not rs:
                continue
            added = ({p: lat[t][p] - lat[NO_MILTER][p] for p in lat[t]}
                     if NO_MILTER in lat and t != NO_MILTER else None)
            rows.append(MilterRow(
                t, size, sessions, len(rs), med([r.msgs_per_s for r in rs]), lat[t], added,
                med([r.milter_cpu_us for r in rs]), med([r.helper_cpu_us for r in rs]),
                med([r.client_cpu_us for r in rs]), med([r.machine_cpu_us for r in rs]),
                med([r.busy_pct for r in rs]), max(r.hwm_mb for r in rs),
                sum(sum(r.problems.values()) for r in rs)))
    return rows


def _added(row: MilterRow, p: str) -> str:
    return f"{row.added_ms[p]:+.1f}" if row.added_ms is not None else "-"


MILTER_COLUMNS: list[tuple[str, str, Callable[[Any], object]]] = [
    ("size", ">6", lambda r: human_size(r.size)),
    ("sess", ">4", lambda r: r.sessions),
    ("target", "<12", lambda r: r.target),
    ("msg/s", ">6.1f", lambda r: r.msgs_per_s),
    ("p50 ms", ">6.1f", lambda r: r.latency_ms["p50"]),
    ("p90 ms", ">6.1f", lambda r: r.latency_ms["p90"]),
    ("p99 ms", ">6.1f", lambda r: r.latency_ms["p99"]),
    ("+p50", ">6", lambda r: _added(r, "p50")),
    ("+p99", ">6", lambda r: _added(r, "p99")),
    ("milter µs", ">9,.0f", lambda r: r.milter_cpu_us),
    ("scanner µs", ">10,.0f", lambda r: r.helper_cpu_us),
    ("client µs", ">9,.0f", lambda r: r.client_cpu_us),
    ("all µs", ">7,.0f", lambda r: r.machine_cpu_us),
    ("busy %", ">6.0f", lambda r: r.busy_pct),
    ("HWM MB", ">6", lambda r: f"{r.hwm_mb:.1f}" if r.target != NO_MILTER else "-"),
    ("bad", ">3", lambda r: r.unexpected_answers),
]


def start_spamassassin(workdir: Path, spamd: BenchSpamd, transport: str,
                       stack: contextlib.ExitStack) -> tuple[int, str]:
    base = workdir / SPAMASSASSIN
    # scan_submission: every message here is an authenticated submission, which is not scored by default
    settings = {"milters": {"spamassassin": {"spamd": {"address": spamd.tcp_address, "timeout": "120s"},
                                             "scan_submission": True}},
                "quarantine": quarantine_settings(base), "logging": {"level": "info"}}
    pid, _log, address = start_milter(base, settings, "spamassassin", transport, stack)
    return pid, address


def run_milters(args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack, pool: AddressPool,
                problems: list[str]) -> dict[str, Any]:
    progress("milters: starting clamd, smtp-sink ...")
    clamd, sink, sink_port = start_common(workdir, stack)
    assert clamd.proc is not None
    clamd_pid = clamd.proc.pid
    targets: dict[str, MilterTarget] = {}
    spamd: BenchSpamd | None = None
    for name in args.targets:
        progress(f"milters: starting {name} ...")
        pid: int | None = None
        address = ""
        helper: Callable[[], float] | None = None
        if name == PHISH:
            base = workdir / PHISH
            _redis, redis_port = start_redis(workdir, stack, "phish-redis")
            pid, _log, address = start_milter(base, phishhook_settings(base, redis_port), "phish", args.socket, stack)
        elif name == CLAMAV:
            pid, _log, address = start_ours(CLAMAV, ["banned", "clamav"], workdir, clamd, args.socket, stack)
            helper = functools.partial(cpu_seconds, clamd_pid)
        elif name == SPAMASSASSIN:
            spamd = BenchSpamd(workdir / "spamd", max_children=max(load.sessions for load in args.milter_loads))
            stack.callback(spamd.stop)
            spamd.start()
            spamd.wait_children()
            assert spamd.proc is not None
            spamd_pgid = spamd.proc.pid
            pid, address = start_spamassassin(workdir, spamd, args.socket, stack)
            helper = functools.partial(group_cpu_seconds, spamd_pgid)
        targets[name] = MilterTarget(name, start_postfix(name, workdir, sink_port, address, stack), pid, helper)
    mails = {load: build_mails(pool, args.users, load.size, load.messages, args.seed + 4) for load in args.milter_loads}
    results: list[MilterRun] = []

    def one(name: str, load: Load, index: int, messages: int) -> None:
        if sink.proc.poll() is not None:
            raise BenchError("smtp-sink exited")
        batch = mails[load][:messages]
        result = run_milter_once(targets[name], batch, load.sessions, index, load.size, args.timeout)
        results.append(result)
        lat = result.latency_ms
        progress(f"milter {human_size(load.size):>6} s{load.sessions:<3} {timed_label(index, args.runs):9} {name:12} "
                 f"{result.msgs_per_s:6.1f} msg/s  p50/p90/p99 {lat['p50']:6.1f} {lat['p90']:6.1f} {lat['p99']:6.1f} "
                 f"ms  milter {result.milter_cpu_us:6.0f} µs  scanner {result.helper_cpu_us:6.0f} µs  client "
                 f"{result.client_cpu_us:5.0f} µs  all {result.machine_cpu_us:6.0f} µs  busy {result.busy_pct:3.0f}%"
                 f"  HWM {result.hwm_mb:5.1f} MB" + (f"  PROBLEMS {result.problems}" if result.problems else ""))
        if result.problems:
            raise BenchError(f"{name}: mail was lost, deferred or refused: {result.problems}; "
                             f"see {targets[name].postfix.maillog}")

    run_passes(list(args.targets), args.milter_loads, args.runs, one)
    rows = summarise_milters(results, args.targets)
    return {"summary": [asdict(r) for r in rows], "runs": [asdict(r) for r in results],
            "table": render_table(rows, MILTER_COLUMNS)}


# -- orchestration ---------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unknown ({exc})"
        text = (done.stdout or done.stderr).strip()
        return text.splitlines()[0] if text else "unknown"

    return {
        "mailwarden": first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
        "python": first_line([sys.executable, "--version"]),
        "redis": first_line(["redis-server", "--version"]),
        "postfix": first_line(["postconf", "-c", "/etc/postfix", "-d", "mail_version"]),
        "clamd": first_line(["clamd", "--version"]),
        "uvicorn": first_line([sys.executable, "-c", "import uvicorn; print(uvicorn.__version__)"]),
    }


def run_benchmark(args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack) -> dict[str, Any]:
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    os.environ.pop("MAILWARDEN_CONFIG", None)
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(), "cpus": os.cpu_count(), "kernel": platform.release(),
        "loadavg_before": load_average(), "versions": versions(),
        "args": {k: ([asdict(v) for v in val] if k == "milter_loads" else
                     str(val) if isinstance(val, Path) else val) for k, val in vars(args).items()},
    }
    homes = max(args.users, int(max(args.events, args.requests / 2.4) / 6) + 200)
    progress(f"finding {homes:,} homes and {homes // 10:,} travel destinations in the City database ...")
    pool = build_pool(city_database(), homes, homes // 10, args.seed)
    problems: list[str] = []
    report: dict[str, Any] = {"meta": meta, "problems": problems}
    parts = [("detector", run_detector), ("auth_policy", run_auth_policy), ("milter", run_milters)]
    for key, run in parts:
        if getattr(args, key):
            report[key] = run(args, workdir, stack, pool, problems)
            meta[f"loadavg_after_{key}"] = load_average()
    meta["loadavg_after"] = load_average()
    return report


def _numbers(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers separated by commas") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers of at least 1")
    return values


def _targets(text: str) -> list[str]:
    names = [t for t in text.split(",") if t]
    if not names or any(t not in MILTER_TARGETS for t in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected a subset of {','.join(MILTER_TARGETS)}")
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark phishhook: logins through the detector, Dovecot auth policy requests through "
                    "`mailwarden phish serve`, and the phish milter's added latency through a private Postfix.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--detector", action="store_true", help="part 1: the detector in this process")
    parser.add_argument("--auth-policy", action="store_true", help="part 2: Dovecot auth policy requests")
    parser.add_argument("--milter", action="store_true", help="part 3: the milters through Postfix")
    parser.add_argument("--events", type=int, default=8000, help="part 1: login events per run")
    parser.add_argument("--threads", type=_numbers, default=[1, 4], help="part 1: thread counts, comma-separated")
    parser.add_argument("--requests", type=int, default=6000, help="part 2: about this many requests per run")
    parser.add_argument("--concurrency", type=_numbers, default=[1, 10, 50],
                        help="part 2: concurrent keep-alive connections, comma-separated")
    parser.add_argument("--targets", type=_targets, default=list(DEFAULT_MILTER_TARGETS),
                        help=f"part 3: comma-separated subset of {','.join(MILTER_TARGETS)} (spamassassin: a "
                             "private spamd, about 250 ms of CPU per message: lower the messages)")
    parser.add_argument("--milter-loads", nargs="+", type=parse_load,
                        default=[parse_load(x) for x in DEFAULT_MILTER_LOADS],
                        help="part 3: SIZE:SESSIONS:MESSAGES per load (the first also warms up)")
    parser.add_argument("--users", type=int, default=200, help="part 3: distinct senders (SASL logins)")
    parser.add_argument("--socket", choices=("inet", "unix"), default="inet",
                        help="part 3: how Postfix reaches the milters")
    parser.add_argument("--runs", type=int, default=3, help="measured runs per row (after one warm-up pass)")
    parser.add_argument("--seed", type=int, default=13, help="seed of the addresses and the streams")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds allowed per run")
    parser.add_argument("--json", type=Path, default=Path("/tmp/phish_bench.json"),
                        help="where to write the results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = parser.parse_args(argv)
    if not (args.detector or args.auth_policy or args.milter):
        args.detector = args.auth_policy = args.milter = True
    if args.runs < 1 or args.events < 50 or args.requests < 100 or args.users < 1:
        parser.error("--runs must be at least 1, --events 50, --requests 100, --users 1")
    if max(load.sessions for load in args.milter_loads) > 200:
        parser.error("--milter-loads: at most 200 sessions")
    return args


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    meta = report["meta"]
    print(f"{meta['date']}  {meta['cpus']} cores  load average before {meta['loadavg_before']} after "
          f"{meta['loadavg_after']}  mailwarden {meta['versions']['mailwarden']}")
    print(f"median of {args.runs} runs per row (ABBA order, one warm-up pass discarded); JSON: {args.json}")
    if "detector" in report:
        s = report["detector"]["stream"]
        print(f"\n1. Detector.login / failed_login in one process ({s['events']:,} events of {s['users']:,} users "
              f"per run: {s[TYPO]} failed, {s[RELAY]} relay, {s[TRAVEL_SNAG]} impossible travels (due snags), "
              f"{s[TRAVEL_OK]} plausible; µs per call)\n")
        print(report["detector"]["table"])
    if "auth_policy" in report:
        s = report["auth_policy"]["stream"]
        print(f"\n2. Dovecot auth policy requests through `mailwarden phish serve` ({s['logins']:,} logins of "
              f"{s['users']:,} users per run: {s[TYPO]} failed, {s[RELAY]} relay, {s[TRAVEL_SNAG]} snags, each "
              f"followed by a login that must be refused)\n")
        print(report["auth_policy"]["table"])
    if "milter" in report:
        print(f"\n3. milters through a private Postfix, XCLIENT sessions of {args.users} users, "
              f"{len(RECIPIENTS)} recipients a message, milters on {args.socket} sockets; latency: connect to the "
              f"250 after DATA\n")
        print(report["milter"]["table"])
    if report["problems"]:
        print("\n(!) problems:\n" + "\n".join(f"  {p}" for p in report["problems"]))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [p for p in (SMTP_SINK,) if args.milter and not Path(p).exists()]
    report = run_in_workdir("mailwarden-phish-bench-", args, run_benchmark, missing)
    if isinstance(report, int):
        return report
    print_report(report, args)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
