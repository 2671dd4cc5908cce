"""Fixtures that stand up real components on loopback; see harness/ for how each is run."""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import pytest
from harness.clamd import ClamdInstance
from harness.dns_server import DnsServer
from harness.dovecot import DovecotInstance
from harness.mariadb import MariaDbInstance
from harness.milter_proc import MilterProcess
from harness.net import free_port, wait_port
from harness.policyd_proc import PolicydProcess
from harness.postfix import PostfixInstance
from harness.redis_server import RedisProcess, start_redis
from harness.sink import Sink
from harness.slapd import SlapdInstance
from harness.spamd import SpamdInstance

from mailwarden.config import ENV_VAR
from mailwarden.paths import ROOT_ENV_VAR

SYSTEM_DIRS = (Path("/etc/mailwarden"), Path("/var/lib/mailwarden"))
"""Where an installed mailwarden keeps its config, rules and managed whitelist: no test reads them."""


@pytest.fixture(scope="session", autouse=True)
def private_system_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every default system path (the config file and its drop-ins, /etc/mailwarden/rules, the managed
    whitelist) moved under an empty temp dir, for this process and every daemon and CLI it starts: a host
    where mailwarden is installed, or where `greylist whitelist-update` once ran, changes no answer.
    $MAILWARDEN_CONFIG from the caller's shell is dropped for the same reason."""
    root = tmp_path_factory.mktemp("system-root")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ROOT_ENV_VAR, str(root))
        patch.delenv(ENV_VAR, raising=False)
        yield root


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """One redis-server for the session, owned by the tests (never the machine's own on 6379)."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_server(shared_redis: RedisProcess) -> RedisProcess:
    shared_redis.client().flushall()
    return shared_redis


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server only this test uses, so it may stop, pause or kill it."""
    server = start_redis(tmp_path / "own-redis")
    yield server
    if server.proc and server.proc.poll() is None:
        server.resume()
    server.stop()


def base_settings(redis_url: str, **policyd: object) -> dict:
    return {"redis": {"url": redis_url, "timeout": "300ms"}, "policyd": dict(policyd)}


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    """The test zones (DNSBL, DNSWL, SPF) served on a loopback port by a DNS server in this process."""
    server = DnsServer().start()
    yield server
    server.stop()


def dns_settings(server: DnsServer) -> dict:
    return {"nameservers": [server.host], "port": server.port, "timeout": "500ms", "tries": 1}


@pytest.fixture
def slapd() -> Iterator[SlapdInstance]:
    """A private slapd with the test directory (alice active, bob disabled, carol with alternate addresses)."""
    with SlapdInstance() as instance:
        yield instance


@pytest.fixture(scope="module")
def dovecot() -> Iterator[DovecotInstance]:
    """A private Dovecot whose quota-status service knows alice (room), full (over quota) and three (5 MB
    quota, about 2 MB used). Module-scoped: Dovecot takes a second to stop."""
    with DovecotInstance() as instance:
        yield instance


@pytest.fixture(scope="module")
def mariadb() -> Iterator[MariaDbInstance]:
    """A private MariaDB server (own datadir and port), never the machine's own."""
    with MariaDbInstance() as instance:
        yield instance


@pytest.fixture
def policyd_factory(tmp_path: Path) -> Iterator[Callable[..., PolicydProcess]]:
    started: list[PolicydProcess] = []

    def start(settings: dict, port: int | None = None) -> PolicydProcess:
        proc = PolicydProcess(tmp_path / "policyd", settings, **({"port": port} if port else {}))
        started.append(proc.start())
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def clamd() -> Iterator[ClamdInstance]:
    """A private clamd with the local test signatures only (unix socket and a loopback TCP port), started
    for this test alone, so the test may stop, restart or pause it."""
    with ClamdInstance() as instance:
        yield instance


@pytest.fixture(scope="module")
def spamd() -> Iterator[SpamdInstance]:
    """A private spamd (loopback TCP port and a unix socket) with per-user preferences and Bayes under its own
    directory, local tests only, TELL allowed, Bayes auto-learning off. Module-scoped: its rules take about a
    second to compile. Tests of one module share it, so each uses user names of its own; a test that stops or
    pauses it starts or resumes it again (``finally``)."""
    with SpamdInstance() as instance:
        yield instance


@pytest.fixture
def sink() -> Iterator[Sink]:
    server = Sink().start()
    yield server
    server.stop()


def need_postfix() -> None:
    if os.geteuid() != 0:
        pytest.fail("end-to-end tests run a private Postfix and need root (run them through `bash tools/test.sh`)")
    if not shutil.which("postfix"):
        pytest.fail("Debian's postfix is not installed (`bash tools/test.sh` installs it)")


@dataclass
class Stack:
    postfix: PostfixInstance
    policyd: PolicydProcess
    sink: Sink

    def smtp(self, client_address: str = "192.0.2.10", login: str | None = None,
             helo: str = "client.example") -> smtplib.SMTP:
        """An SMTP session to the private Postfix, presenting ``client_address`` (and a SASL login) via XCLIENT."""
        conn = smtplib.SMTP("127.0.0.1", self.postfix.smtp_port, timeout=30)
        conn.ehlo(helo)
        args = f"ADDR={client_address} NAME=unknown" + (f" LOGIN={login}" if login else "")
        code, text = conn.docmd("XCLIENT", args)
        assert code == 220, (code, text)
        conn.ehlo(helo)
        return conn


@pytest.fixture
def stack_factory(tmp_path: Path, sink: Sink, policyd_factory) -> Iterator[Callable[[dict], Stack]]:
    """Real Postfix -> check_policy_service -> our policyd (a separate process) -> Redis; Postfix relays to the sink."""
    need_postfix()
    instances: list[PostfixInstance] = []

    def start(settings: dict, smtp_port: int | None = None, relay_domains: str = "example.test") -> Stack:
        policyd = policyd_factory(settings)
        # Postfix's own processes run as user postfix: its directory must not sit under pytest's 0700 tmp dir
        directory = Path(tempfile.mkdtemp(prefix="mw-postfix-"))
        directory.chmod(0o755)
        postfix = PostfixInstance(directory, smtp_port or free_port(), sink.port, policyd.port, relay_domains)
        instances.append(postfix.start())
        wait_port(postfix.smtp_port)
        return Stack(postfix, policyd, sink)

    yield start
    for instance in instances:
        instance.stop()
        shutil.rmtree(instance.directory, ignore_errors=True)


def message(subject: str, sender: str = "sender@example.org", to: str = "user@example.test") -> str:
    message_id = subject.replace(" ", ".")
    return f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{message_id}@t>\r\n\r\nhello\r\n"


# --- the milter stack: smtplib -> a private Postfix -> our milter process -> a private clamd; the sink ---

@dataclass
class MilterStack:
    postfix: PostfixInstance
    milter: MilterProcess
    """The first milter Postfix calls (the ClamAV one unless ``milters`` said otherwise)."""
    clamd: ClamdInstance
    sink: Sink
    front: PostfixInstance | None = None
    milters: dict[str, MilterProcess] = field(default_factory=dict)
    """Every milter process, by name, in Postfix's order."""

    def smtp(self, login: str | None = None, port: int | None = None) -> smtplib.SMTP:
        conn = smtplib.SMTP("127.0.0.1", port or self.postfix.smtp_port, timeout=60)
        conn.ehlo("client.example")
        args = "ADDR=192.0.2.10 NAME=unknown" + (f" LOGIN={login}" if login else "")
        code, text = conn.docmd("XCLIENT", args)
        assert code == 220, (code, text)
        conn.ehlo("client.example")
        return conn

    def send(self, msg: EmailMessage | bytes, rcpts: tuple[str, ...] = ("user@example.test",),
             sender: str = "sender@example.org", login: str | None = None) -> tuple[int, str] | None:
        """None when Postfix accepted it, else the (code, text) of the refusal at end of data."""
        data = msg if isinstance(msg, bytes) else msg.as_bytes()
        with self.smtp(login) as conn:
            try:
                conn.sendmail(sender, list(rcpts), data)
            except smtplib.SMTPDataError as exc:
                return exc.smtp_code, exc.smtp_error.decode()
        return None

    def send_via_front(self, msg: EmailMessage, sender: str = "sender@example.org",
                       rcpts: tuple[str, ...] = ("user@example.test",)) -> None:
        """Hand a message to the sending MTA (``front=True``), which relays it to ours and queues what we
        tempfail."""
        assert self.front is not None
        with smtplib.SMTP("127.0.0.1", self.front.smtp_port, timeout=30) as conn:
            conn.sendmail(sender, list(rcpts), msg.as_bytes())

    def marker(self, subject: str = "marker") -> None:
        """A clean message sent after the one under test, waited for: once it arrived, anything sent before
        it that was going to arrive has arrived (a positive signal instead of a pause)."""
        assert self.send(text_message(subject)) is None
        self.sink.wait_for_subjects(subject, timeout=30)


def text_message(subject: str, body: str = "hello\n", sender: str = "sender@example.org",
                 to: str = "user@example.test") -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, subject
    msg["Message-ID"] = f"<{subject.replace(' ', '.')}@test>"
    msg.set_content(body)
    return msg


def milter_settings(clamd: ClamdInstance, **clamav: object) -> dict:
    return {"milters": {"clamav": {"clamd": clamd.unix_address, "retry_pause": "200ms", **clamav}}}


def mailwarden(milter: MilterProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI with the milter's config; fails the test on a non-zero exit."""
    done = subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(milter.config_path), *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (args, done.returncode, done.stdout, done.stderr)
    return done


@pytest.fixture
def milter_stack(tmp_path: Path, clamd: ClamdInstance, sink: Sink) -> Iterator[Callable[..., MilterStack]]:
    need_postfix()
    started: list[MilterStack] = []

    def start(settings: dict | None = None, front: bool = False, unix_socket: Path | None = None,
              postfix_main_cf: str = "", milters: tuple[str, ...] = ("clamav",),
              postfix_master_cf: str = "") -> MilterStack:
        """``unix_socket``: the (first) milter listens there instead of a TCP port; ``postfix_main_cf`` and
        ``postfix_master_cf``: lines added to the main.cf and master.cf of our Postfix (the one with the
        milters); ``milters``: the milter processes, chained in this order in smtpd_milters, all with the same
        config. A ``quarantine`` section given without ``reinject`` gets the stack's listener."""
        reinject_port = free_port()
        settings = settings or milter_settings(clamd)
        quarantine = settings.setdefault("quarantine", {
            "database_url": f"sqlite:///{tmp_path / 'quarantine.sqlite'}", "message_dir": str(tmp_path / "held")})
        quarantine.setdefault("reinject", f"127.0.0.1:{reinject_port}")
        processes = {name: MilterProcess(tmp_path / "milter", settings, name=name,
                                         unix_socket=unix_socket if index == 0 else None)
                     for index, name in enumerate(milters)}
        for process in processes.values():
            process.write_config()
        milter = next(iter(processes.values()))
        mailwarden(milter, "quarantine", "migrate")
        for process in processes.values():
            process.start()
        directory = Path(tempfile.mkdtemp(prefix="mw-postfix-"))
        directory.chmod(0o755)
        postfix = PostfixInstance(directory, free_port(), sink.port, None,
                                  milters=", ".join(process.address for process in processes.values()),
                                  reinject_port=reinject_port, extra_main_cf=postfix_main_cf,
                                  extra_master_cf=postfix_master_cf).start()
        wait_port(postfix.smtp_port)
        stack = MilterStack(postfix, milter, clamd, sink, milters=processes)
        if front:  # the sending MTA: no milter, relays everything to ours and retries what we tempfail
            front_dir = Path(tempfile.mkdtemp(prefix="mw-postfix-front-"))
            front_dir.chmod(0o755)
            stack.front = PostfixInstance(front_dir, free_port(), postfix.smtp_port, None).start()
            wait_port(stack.front.smtp_port)
        started.append(stack)
        return stack

    yield start
    for stack in started:
        for instance in (stack.front, stack.postfix):
            if instance is not None:
                instance.stop()
                shutil.rmtree(instance.directory, ignore_errors=True)
        for process in stack.milters.values():
            process.kill()  # libmilter takes about 4 s to stop on SIGTERM: that is tested once, below
