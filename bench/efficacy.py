"""Spam catch rate: the SpamAssassin check on the public corpora, before and after training Bayes.

The corpora (``--corpus``, default ../shared/corpus beside the repository; nothing in the product reads it):

- ``spamassassin-public``: ``easy_ham`` + ``easy_ham_2`` (class ``ham-easy``), ``hard_ham`` (``ham-hard``),
  ``spam`` + ``spam_2`` (``spam``); the folders that are present;
- ``phishing_pot``: its ``*.eml`` (class ``phish``, spam for Bayes and for the aims).

**Split.** Per class, the file names sorted, shuffled with ``random.Random(seed)``, cut to ``--limit`` when
given, and halved: the first half trains, the second half is the test half (the larger when odd). The same
seed gives the same halves on every machine.

**Scoring, as the milter does.** Each test message becomes what the milter holds at end of message: the mbox
``From `` line the corpus keeps is dropped and the line ends made CRLF (Postfix hands the milter CRLF), in a
``milters.spool.Spool``, one recipient. It is judged by the milter's own ``SpamAssassinCheck`` with the
default ``SpamAssassinSettings`` (tag 5.0, hold 8.0, reject 15.0; above ``spamd.max_size`` the sample of
``milters.spam_sample``), no preferences store, and the real ``MailboxResolver`` without recipient sources,
so spamd is asked as the recipient's address, one bench user for every message. The client records each
spamd answer, which gives "stock SpamAssassin alone": spamd's own verdict (``is_spam``, its
``required_score`` 5.0) on the same message.

**spamd.** The test harness's private spamd (tests/harness/spamd.py) in a new directory each run: the
package's stock rules, local tests only (``-L``), per-user Bayes under its directory, auto-learning off.
Bayes's minimums are put back to SpamAssassin's defaults (200 spam and 200 ham learned before Bayes is used;
the harness lowers them to 1 for its tests). ``--local-cf FILE`` adds a site config file (a candidate
``rules/spamassassin/*.cf``) after it.

**Order.** Score the test half (BEFORE: no Bayes database), TELL every training message as its class to the
bench user (``SpamdClient.tell``, what ``spam learn`` calls; ``--jobs`` threads), read the database's counts
with ``sa-learn --dump magic``, score the test half again (AFTER). Throughput is messages/s of a scoring pass
with ``--jobs`` threads (spamd gets as many children): wall clock on whatever machine this is.

**Tuning** (``--folds``) never reads the test half: the training half is cut in two folds (each class
alternating), one user learns each fold and judges the other, with Bayes's minimums at 150 (a fold holds
about 154 ham and 175 spam). A candidate rules file is tried so (``--folds --local-cf FILE`` against
``--folds``), and only the one chosen is then measured on the test half, once.

Run as root (spamd's children run as debian-spamd, as the harness does)::

    .venv/bin/python bench/efficacy.py [--seed 1] [--jobs 4] [--limit N] [--folds] [--local-cf FILE] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from procstat import load_average

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "tests"):  # the product's packages, and the harness (tests/harness/*)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from harness.spamd import SpamdInstance  # noqa: E402

from mailwarden.directory import DirectorySettings  # noqa: E402
from milters.check import Message  # noqa: E402
from milters.mailbox import MailboxResolver  # noqa: E402
from milters.spamassassin import SpamAssassinCheck, SpamAssassinSettings  # noqa: E402
from milters.spamd_client import Kind, SpamdClient, SpamdError, SpamReport  # noqa: E402
from milters.spool import Spool  # noqa: E402
from milters.verdict import Fate, Verdict  # noqa: E402

DEFAULT_CORPUS = REPO.parent / "shared" / "corpus"
BENCH_USER = "efficacy@bench.example"
"""The one recipient of every message, hence the one spamd user (its Bayes database)."""
FOLD_USERS = ("efficacy-a@bench.example", "efficacy-b@bench.example")
"""With --folds: the users trained on the training half's first and second fold."""
BAYES_MIN = 200
"""SpamAssassin's own minimums (bayes_min_spam_num, bayes_min_ham_num), over the harness's 1 and 1."""
BAYES_MIN_FOLDS = 150
"""With --folds each user learns half of the training half (about 154 ham and 175 spam): below 200."""


@dataclass(frozen=True)
class CorpusClass:
    name: str
    kind: Kind
    """What Bayes is told, and which aim applies."""
    folders: tuple[str, ...]
    pattern: str = "*"


CLASSES = (
    CorpusClass("ham-easy", "ham", ("spamassassin-public/easy_ham", "spamassassin-public/easy_ham_2")),
    CorpusClass("ham-hard", "ham", ("spamassassin-public/hard_ham",)),
    CorpusClass("spam", "spam", ("spamassassin-public/spam", "spamassassin-public/spam_2")),
    CorpusClass("phish", "spam", ("phishing_pot",), "*.eml"),
)
TOTALS: tuple[tuple[str, Kind], ...] = (("ham (all)", "ham"), ("spam + phish", "spam"))


@dataclass(frozen=True)
class Sample:
    path: str
    """Relative to the corpus directory."""
    cls: str
    kind: Kind


@dataclass
class Split:
    train: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)


def split_corpus(corpus: Path, seed: int, limit: int | None) -> Split:
    split = Split()
    for cls in CLASSES:
        names = sorted(str(file.relative_to(corpus)) for folder in cls.folders if (corpus / folder).is_dir()
                       for file in (corpus / folder).glob(cls.pattern) if file.is_file())
        random.Random(seed).shuffle(names)
        if limit is not None:
            names = names[:limit]
        half = len(names) // 2
        split.train += [Sample(name, cls.name, cls.kind) for name in names[:half]]
        split.test += [Sample(name, cls.name, cls.kind) for name in names[half:]]
    return split


def as_received(raw: bytes) -> bytes:
    """The message as the milter spools it: without the corpus's mbox ``From `` line, with CRLF line ends."""
    if raw.startswith(b"From "):
        raw = raw.split(b"\n", 1)[1] if b"\n" in raw else b""
    return re.sub(rb"\r?\n", b"\r\n", raw)


def body_digest(corpus: Path, sample: Sample) -> str:
    data = as_received((corpus / sample.path).read_bytes())
    return hashlib.sha256(data.split(b"\r\n\r\n", 1)[-1]).hexdigest()


def repeats(corpus: Path, learn: Assignment, judge: Assignment) -> set[tuple[str, str]]:
    """(user, path) of the judged messages whose body is byte for byte one that user learned (a spam run
    sent again, a digest repeated): Bayes has seen them."""
    seen = {(user, body_digest(corpus, sample)) for user, sample in learn}
    return {(user, sample.path) for user, sample in judge if (user, body_digest(corpus, sample)) in seen}


# -- scoring through the milter's check ------------------------------------------------------------------


class RecordingClient(SpamdClient):
    """The milter's spamd client, keeping the last report of each thread (the check does not return it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last = threading.local()

    def check(self, message: bytes | BinaryIO, user: str, timeout: float | None = None) -> SpamReport:
        self.last.report = None
        report = super().check(message, user, timeout)
        self.last.report = report
        return report


@dataclass
class Scored:
    path: str
    cls: str
    size: int
    fate: str
    """The milter's verdict for the recipient: accept, tag, quarantine, reject, tempfail (spamd failed)."""
    score: float | None
    stock_spam: bool | None
    """spamd's own is_spam (score >= its required_score)."""
    sampled: bool
    rules: list[tuple[str, float | None]]
    """The rules hit and their scores (what-if sums: the score is their total)."""
    reason: str
    user: str


def score_one(check: SpamAssassinCheck, client: RecordingClient, corpus: Path, user: str, sample: Sample,
              number: int) -> Scored:
    data = as_received((corpus / sample.path).read_bytes())
    spool = Spool()
    spool.write(data)
    # no client: the check then adds no Received hop (the corpus's messages carry their own, from where
    # they were collected; a hop from a documentation address would add RCVD_ILLEGAL_IP to every one)
    message = Message(queue_id=f"EFF{number:05d}", client_address="", client_name="",
                      helo="", sender="", recipients=[user], auth_user="", spool=spool)
    try:
        result = check.check(message)
    finally:
        spool.close()
    verdict = result[user] if not isinstance(result, Verdict) else result
    report: SpamReport | None = getattr(client.last, "report", None)
    return Scored(sample.path, sample.cls, len(data), str(verdict.fate),
                  report.score if report else None, report.is_spam if report else None,
                  len(data) > check.settings.spamd.max_size,
                  [(rule.name, rule.score) for rule in report.rules] if report else [], verdict.reason, user)


@dataclass
class Pass:
    name: str
    seconds: float
    results: list[Scored]

    @property
    def rate(self) -> float:
        return len(self.results) / self.seconds if self.seconds else 0.0


def run_parallel(jobs: int, items: Sequence[Any], work: Callable[[int, Any], Any],
                 label: str) -> tuple[list[Any], float]:
    """``work(index, item)`` over ``items`` in ``jobs`` threads; results in order, and the wall time."""
    done = 0
    lock = threading.Lock()

    def one(pair: tuple[int, Any]) -> Any:
        nonlocal done
        result = work(*pair)
        with lock:
            done += 1
            if done % 100 == 0 or done == len(items):
                progress(f"{label}: {done}/{len(items)}")
        return result

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(one, enumerate(items)))
    return results, time.monotonic() - started


Assignment = list[tuple[str, Sample]]
"""(spamd user, message) pairs: who scores or learns what."""


def score_pass(name: str, check: SpamAssassinCheck, client: RecordingClient, corpus: Path,
               pairs: Assignment, jobs: int) -> Pass:
    results, seconds = run_parallel(jobs, pairs, lambda n, pair: score_one(check, client, corpus, pair[0], pair[1], n),
                                    f"score {name}")
    return Pass(name, seconds, results)


@dataclass
class Training:
    told: int
    learned: int
    already: int
    failed: list[str]
    seconds: float
    counts: dict[str, tuple[int, int] | None]
    """Each user's (nspam, nham) as sa-learn --dump magic reads the database."""

    @property
    def rate(self) -> float:
        return self.told / self.seconds if self.seconds else 0.0


def train(client: SpamdClient, corpus: Path, pairs: Assignment, jobs: int, spamd: SpamdInstance) -> Training:
    def tell(_: int, pair: tuple[str, Sample]) -> bool | str:
        user, sample = pair
        try:
            return client.tell(as_received((corpus / sample.path).read_bytes()), user, sample.kind, timeout=300)
        except SpamdError as exc:
            return f"{sample.path}: {exc}"

    # each user's first message alone: parallel TELLs to a user without a database race to create it
    # (spamd logs "bayes db version 0 is not able to be used")
    first = {user: index for index, (user, _) in reversed(list(enumerate(pairs)))}
    ordered = [pairs[index] for index in sorted(first.values())]
    ordered += [pair for index, pair in enumerate(pairs) if index not in first.values()]
    started = time.monotonic()
    results = [tell(0, pair) for pair in ordered[:len(first)]]
    rest, _ = run_parallel(jobs, ordered[len(first):], tell, "tell")
    results += rest
    seconds = time.monotonic() - started
    return Training(told=len(pairs), learned=sum(r is True for r in results),
                    already=sum(r is False for r in results), failed=[r for r in results if isinstance(r, str)],
                    seconds=seconds, counts={user: spamd.bayes_counts(user) for user in sorted({u for u, _ in pairs})})


# -- figures ---------------------------------------------------------------------------------------------


def percent(part: int, whole: int) -> float | None:
    return round(100.0 * part / whole, 2) if whole else None


def summarize(results: Iterable[Scored], kind: Kind) -> dict[str, Any]:
    rows = list(results)
    n = len(rows)
    tagged = sum(r.fate == Fate.TAG for r in rows)
    held = sum(r.fate in (Fate.QUARANTINE, Fate.REJECT) for r in rows)
    rejected = sum(r.fate == Fate.REJECT for r in rows)
    stock = sum(bool(r.stock_spam) for r in rows)
    summary: dict[str, Any] = {
        "count": n, "tagged": tagged, "held": held, "of_which_rejected": rejected,
        "unscanned": sum(r.fate == Fate.TEMPFAIL for r in rows), "sampled": sum(r.sampled for r in rows),
        "stock_spam": stock,
    }
    if kind == "ham":
        summary |= {"pct_tagged": percent(tagged, n), "pct_held": percent(held, n),
                    "pct_stock_spam": percent(stock, n)}
    else:
        summary |= {"pct_tagged_or_held": percent(tagged + held, n), "pct_held": percent(held, n),
                    "pct_stock_spam": percent(stock, n)}
    return summary


def summaries(results: Sequence[Scored]) -> dict[str, dict[str, Any]]:
    out = {cls.name: summarize((r for r in results if r.cls == cls.name), cls.kind) for cls in CLASSES}
    kinds = {cls.name: cls.kind for cls in CLASSES}
    for label, kind in TOTALS:
        out[label] = summarize((r for r in results if kinds[r.cls] == kind), kind)
    return out


def aims(after: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ham, spam = after["ham (all)"], after["spam + phish"]
    return {
        "spam_tagged_or_held_pct": spam["pct_tagged_or_held"], "spam_aim_min_pct": 90.0,
        "ham_held_pct": ham["pct_held"], "ham_held_aim_max_pct": 0.5,
        "ham_tagged_pct": ham["pct_tagged"], "ham_tagged_aim_max_pct": 2.0,
        "met": (spam["pct_tagged_or_held"] or 0) >= 90.0 and (ham["pct_held"] or 0) <= 0.5
        and (ham["pct_tagged"] or 0) <= 2.0,
    }


WHAT_IF_HOLD = (8.0, 9.0, 10.0, 11.0, 12.0)


def hold_what_if(results: Sequence[Scored], tag: float) -> list[dict[str, Any]]:
    """Ham tagged and held, spam held, were the hold level another: exact from the scores, since the levels
    are ours and change nothing in spamd's answer (spam tagged or held does not depend on it)."""
    kinds = {cls.name: cls.kind for cls in CLASSES}
    ham = [r.score for r in results if kinds[r.cls] == "ham" and r.score is not None]
    spam = [r.score for r in results if kinds[r.cls] == "spam" and r.score is not None]
    return [{"hold": hold, "ham_pct_tagged": percent(sum(tag <= x < hold for x in ham), len(ham)),
             "ham_pct_held": percent(sum(x >= hold for x in ham), len(ham)),
             "spam_pct_held": percent(sum(x >= hold for x in spam), len(spam))} for hold in WHAT_IF_HOLD]


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(passes: dict[str, dict[str, dict[str, Any]]]) -> str:
    head = (f"{'class':<14} {'pass':<7} {'count':>5} {'tagged':>6} {'held':>5} {'rej':>4} "
            f"{'% tagged':>8} {'% held':>6} {'% tag|held':>10} {'stock SA %':>10} {'unscanned':>9}")
    lines = [head, "-" * len(head)]
    kinds = {cls.name: cls.kind for cls in CLASSES} | dict(TOTALS)
    for label in [cls.name for cls in CLASSES] + [label for label, _ in TOTALS]:
        for name, figures in passes.items():
            s = figures[label]
            ham = kinds[label] == "ham"
            lines.append(f"{label:<14} {name:<7} {s['count']:>5} {s['tagged']:>6} {s['held']:>5} "
                         f"{s['of_which_rejected']:>4} {fmt(s['pct_tagged']) if ham else '':>8} "
                         f"{fmt(s['pct_held']) if ham else '':>6} "
                         f"{'' if ham else fmt(s['pct_tagged_or_held']):>10} {fmt(s['pct_stock_spam']):>10} "
                         f"{s['unscanned']:>9}")
    return "\n".join(lines)


def progress(text: str) -> None:
    print(f"[{datetime.datetime.now(datetime.UTC):%H:%M:%S}] {text}", file=sys.stderr, flush=True)


def git_describe() -> str:
    result = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                            text=True, check=False)
    return result.stdout.strip() or "unknown"


def folds(samples: Sequence[Sample]) -> tuple[list[Sample], list[Sample]]:
    """Two halves of ``samples``, each class alternating between them in its shuffled order."""
    first: list[Sample] = []
    second: list[Sample] = []
    for cls in CLASSES:
        members = [sample for sample in samples if sample.cls == cls.name]
        first += members[0::2]
        second += members[1::2]
    return first, second


def assignments(split: Split, cross: bool) -> tuple[Assignment, Assignment, int]:
    """What is learned, what is judged, and Bayes's minimums: the training half learned and the test half
    judged as BENCH_USER; with ``cross``, the training half only, in two folds, each judged by the user that
    learned the other."""
    if not cross:
        return ([(BENCH_USER, s) for s in split.train], [(BENCH_USER, s) for s in split.test], BAYES_MIN)
    first, second = folds(split.train)
    a, b = FOLD_USERS
    return ([(a, s) for s in first] + [(b, s) for s in second], [(a, s) for s in second] + [(b, s) for s in first],
            BAYES_MIN_FOLDS)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1, help="shuffle seed of the split (default 1)")
    parser.add_argument("--jobs", type=int, default=4, help="parallel spamd requests, scoring and TELL (default 4)")
    parser.add_argument("--limit", type=int, default=None, help="at most N messages per class, before halving")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help=f"default {DEFAULT_CORPUS}")
    parser.add_argument("--local-cf", type=Path, default=None,
                        help="a site config file added to spamd's local.cf (a candidate rules/spamassassin/*.cf)")
    parser.add_argument("--folds", action="store_true",
                        help="for tuning: the training half only, two folds, each judged after Bayes learned the "
                             f"other (Bayes minimums {BAYES_MIN_FOLDS}); the test half is not read")
    parser.add_argument("--json", action="store_true", help="print JSON (figures and every message's result)")
    parser.add_argument("--keep", action="store_true", help="keep spamd's directory (log, Bayes database)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    corpus = args.corpus.resolve()
    split = split_corpus(corpus, args.seed, args.limit)
    if not split.test:
        parser.error(f"{corpus}: no messages of any class found")
    learn, judge, bayes_min = assignments(split, args.folds)
    for user in sorted({u for u, _ in learn}):
        told = {kind: sum(u == user and s.kind == kind for u, s in learn) for kind in ("spam", "ham")}
        if min(told.values()) < bayes_min:
            progress(f"warning: {user} learns {told['spam']} spam and {told['ham']} ham; Bayes is used only after "
                     f"{bayes_min} of each: AFTER will score without Bayes")
    local_cf = (f"bayes_min_spam_num {bayes_min}\nbayes_min_ham_num {bayes_min}\n"
                + (args.local_cf.read_text() if args.local_cf else ""))
    settings = SpamAssassinSettings()
    load_before = load_average()
    started = datetime.datetime.now(datetime.UTC)
    with contextlib.ExitStack() as stack:
        spamd = SpamdInstance(local_cf=local_cf, max_children=args.jobs)
        stack.callback(spamd.stop if args.keep else spamd.cleanup)
        spamd.start()
        progress(f"spamd ready at {spamd.tcp_address} ({spamd.workdir}); judging {len(judge)}, learning "
                 f"{len(learn)}{' (folds of the training half)' if args.folds else ''}")
        settings = settings.model_copy(update={"spamd": settings.spamd.model_copy(
            update={"address": spamd.tcp_address})})
        client = RecordingClient(settings.spamd)
        stack.callback(client.close)
        check = SpamAssassinCheck(settings, MailboxResolver(DirectorySettings(), 60), None, client=client)
        before = score_pass("before", check, client, corpus, judge, args.jobs)
        training = train(client, corpus, learn, args.jobs, spamd)
        progress(f"Bayes (nspam, nham) by sa-learn --dump magic: {training.counts}")
        after = score_pass("after", check, client, corpus, judge, args.jobs)
        spamd_log = spamd.log_text()
    seen = repeats(corpus, learn, judge)
    figures = {"before": summaries(before.results), "after": summaries(after.results),
               "new": summaries([r for r in after.results if (r.user, r.path) not in seen])}
    meta = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"), "version": git_describe(), "host": platform.node(),
        "cores": os.cpu_count(), "load_before": load_before, "load_after": load_average(),
        "command": " ".join(["bench/efficacy.py", *(argv if argv is not None else sys.argv[1:])]),
        "seed": args.seed, "jobs": args.jobs, "limit": args.limit, "corpus": str(corpus),
        "local_cf": str(args.local_cf) if args.local_cf else None, "folds": args.folds,
        "bayes_min": bayes_min,
        "levels": {"tag": settings.tag_level, "hold": settings.hold_level, "reject": settings.reject_level},
        "max_size": settings.spamd.max_size, "part_size": settings.part_size,
        "users": sorted({u for u, _ in judge}),
        "learned": {cls.name: sum(s.cls == cls.name for _, s in learn) for cls in CLASSES},
        "judged": {cls.name: sum(s.cls == cls.name for _, s in judge) for cls in CLASSES},
        "repeated_bodies": len(seen),
        "spamd_warnings": [line for line in spamd_log.splitlines()
                           if re.search(r"\bwarn:|config: failed|\berror\b", line)][:20],
    }
    what_if = hold_what_if(after.results, settings.tag_level)
    throughput = {"before_msgs_per_s": round(before.rate, 2), "after_msgs_per_s": round(after.rate, 2),
                  "tell_msgs_per_s": round(training.rate, 2)}
    for line in meta["spamd_warnings"]:
        progress(f"spamd: {line}")  # a rule file spamd could not read says so here
    if args.json:
        json.dump({"meta": meta, "figures": figures, "aims_after": aims(figures["after"]),
                   "aims_before": aims(figures["before"]), "training": asdict(training) | {"rate": training.rate},
                   "throughput": throughput, "hold_what_if_after": what_if,
                   "messages": {"before": [asdict(r) for r in before.results],
                                "after": [asdict(r) for r in after.results]}}, sys.stdout, indent=1)
        print()
    else:
        print(f"# {meta['date']}  {meta['version']}  seed {args.seed}  jobs {args.jobs}  limit {args.limit}  "
              f"cores {meta['cores']}  load {load_before} -> {meta['load_after']}")
        print(f"# levels tag {settings.tag_level:g} hold {settings.hold_level:g} reject {settings.reject_level:g}; "
              f"stock SA % = spamd's is_spam (required_score 5.0); local.cf extra: {meta['local_cf'] or 'none'}")
        print(f"# learned {meta['learned']}  judged {meta['judged']}"
              f"{'  (--folds: the training half, cross-fold; Bayes minimums 150)' if args.folds else ''}")
        print(table(figures))
        dropped = {label: figures["after"][label]["count"] - figures["new"][label]["count"]
                   for label in [cls.name for cls in CLASSES]}
        print(f"# new = after, without the {len(seen)} judged messages whose body is one Bayes learned (the same "
              "text sent again): " + ", ".join(f"{label} {count}" for label, count in dropped.items()))
        print(f"# Bayes after TELL (nspam, nham): {training.counts}; told {training.told}, learned "
              f"{training.learned}, already {training.already}, failed {len(training.failed)}")
        print(f"# throughput ({args.jobs} threads): scoring before {before.rate:.2f} msg/s, after {after.rate:.2f} "
              f"msg/s; TELL {training.rate:.2f} msg/s")
        print("# after, were the hold level another (ham tagged / ham held / spam held %): " + "; ".join(
            f"{row['hold']:g}: {fmt(row['ham_pct_tagged'])} / {fmt(row['ham_pct_held'])} / {fmt(row['spam_pct_held'])}"
            for row in what_if))
        result = aims(figures["after"])
        print(f"# aims after training: spam tagged or held {fmt(result['spam_tagged_or_held_pct'])}% (>= 90), "
              f"ham held {fmt(result['ham_held_pct'])}% (<= 0.5), ham tagged {fmt(result['ham_tagged_pct'])}% "
              f"(<= 2): {'met' if result['met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
