"""A private Dovecot with its quota-status policy service on loopback (needs root and Debian's dovecot-core,
dovecot-imapd).

mailwarden asks Dovecot's quota-status service (a Postfix policy protocol server) whether a message still
fits in the recipient's mailbox. This instance has its own base_dir, state_dir, log and instance_name, so it
never touches /etc/dovecot or a system instance. The master runs as root; mail processes run as uid 65534
(nobody), login as dovenull, internals as dovecot (users the Debian package creates), so the directory must
be traversable by them: a tempfile.mkdtemp directory with mode 0755 (pytest's tmp dirs are 0700), and short
(Dovecot's unix sockets live in base_dir and socket paths are limited to 108 bytes).

Users (quota rule per user; mailboxes filled on the first start by dropping files into the Maildir and
running ``doveadm quota recalc``, because ``doveadm save`` refuses once a mailbox is full, and doveadm needs
the running auth service):

* alice@example.org: 1M quota, one small message
* carol@example.org: 1M quota, empty
* full@example.org: 20K quota, ~31K used (over quota)
* three@example.org: 5M quota, ~2M used (a 1 MB message fits, a 5 MB one does not)

Verdicts: success and unknown user -> DUNNO (no verdict, later restrictions run), over quota ->
``552 5.2.2 Mailbox is full``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.lifecycle import ServerLifecycle
from harness.net import free_port

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
DOVEADM = shutil.which("doveadm") or "/usr/bin/doveadm"
MAIL_UID = 65534  # nobody: needs no user of its own
MAIL_GID = 65534  # nogroup

OVERQUOTA = "552 5.2.2 Mailbox is full"

DOVECOT_CONF = """\
# private test instance: dovecot -c {d}/dovecot.conf
instance_name = mw-dovecot-{imap_port}
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 1000

mail_location = maildir:~/Maildir
mail_plugins = $mail_plugins quota
namespace inbox {{
  inbox = yes
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {d}/users
}}
userdb {{
  driver = passwd-file
  args = {d}/users
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
protocol imap {{
  mail_plugins = $mail_plugins imap_quota
}}
plugin {{
  quota = maildir:User quota
  quota_rule = *:storage=1M
  quota_status_success = DUNNO
  quota_status_nouser = DUNNO
  quota_status_overquota = {overquota}
}}
service quota-status {{
  executable = quota-status -p postfix
  inet_listener {{
    address = 127.0.0.1
    port = {quota_port}
  }}
  client_limit = 1
}}
{auth_policy}"""

AUTH_POLICY_CONF = """\
# the auth policy server (phishhook): allow before and after authentication, report after it
auth_policy_server_url = {url}
auth_policy_server_api_header = {api_header}
auth_policy_hash_nonce = mw-test-nonce
auth_policy_server_timeout_msecs = {timeout_ms}
auth_policy_request_attributes = login=%{{requested_username}} pwhash=%{{hashed_password}} remote=%{{rip}} \
device_id=%{{client_id}} protocol=%s session_id=%{{session}}
auth_policy_check_before_auth = yes
auth_policy_check_after_auth = yes
auth_policy_report_after_auth = yes
auth_policy_reject_on_fail = no
# a proxy on loopback may pass the client's address (IMAP ID x-originating-ip)
login_trusted_networks = 127.0.0.0/8
"""


@dataclass(frozen=True)
class AuthPolicy:
    """Dovecot's auth policy pointed at a server (phishhook's ``/policy``), as the README documents it."""

    url: str
    api_header: str
    timeout_ms: int = 2000


@dataclass(frozen=True)
class MailUser:
    address: str
    password: str
    quota: str | None = None  # Dovecot quota_rule storage value ("20K", "5M"); None = the 1M default
    fill: int = 0  # bytes of mail in the mailbox at start


DEFAULT_USERS = (
    MailUser("alice@example.org", "alicepw", fill=4_000),
    MailUser("carol@example.org", "carolpw"),
    MailUser("full@example.org", "fullpw", quota="20K", fill=31_000),
    MailUser("three@example.org", "threepw", quota="5M", fill=2_000_000),
)


def filler_message(to: str, size: int) -> bytes:
    """A plain RFC 5322 message of about ``size`` bytes (CRLF lines, as Dovecot stores them)."""
    head = f"From: filler@example.org\r\nTo: {to}\r\nSubject: filler {size}\r\n\r\n".encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def quota_status_request(port: int, recipient: str, size: int | None = None, host: str = "127.0.0.1",
                         timeout: float = 3.0, protocol_state: str = "RCPT") -> str:
    """One Postfix policy request to quota-status; returns the ``action=`` value ("DUNNO", "552 ...")."""
    attrs = {"request": "smtpd_access_policy", "protocol_state": protocol_state, "protocol_name": "ESMTP",
             "client_address": "192.0.2.1", "sender": "sender@example.net", "recipient": recipient}
    if size is not None:
        attrs["size"] = str(size)
    request = "".join(f"{k}={v}\n" for k, v in attrs.items()) + "\n"
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request.encode())
        buf = b""
        while not buf.endswith(b"\n\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            buf += chunk
    for line in buf.decode().splitlines():
        if line.startswith("action="):
            return line.removeprefix("action=")
    raise ValueError(f"quota-status sent no action: {buf!r}")


@dataclass
class DovecotInstance(ServerLifecycle):
    directory: Path | None = None
    imap_port: int = field(default_factory=free_port)
    quota_port: int = field(default_factory=free_port)
    users: tuple[MailUser, ...] = DEFAULT_USERS
    auth_policy: AuthPolicy | None = None
    proc: subprocess.Popen[bytes] | None = None
    _owns_directory: bool = field(default=False, init=False, repr=False)
    _built: bool = field(default=False, init=False, repr=False)
    _filled: bool = field(default=False, init=False, repr=False)

    @property
    def workdir(self) -> Path:
        assert self.directory is not None, "not built yet"
        return self.directory

    @property
    def conf(self) -> Path:
        return self.workdir / "dovecot.conf"

    def maildir(self, address: str) -> Path:
        return self.workdir / "mail" / address / "Maildir"

    def quota_status(self, recipient: str, size: int | None = None) -> str:
        return quota_status_request(self.quota_port, recipient, size)

    def doveadm(self, *args: str, stdin: bytes | None = None) -> str:
        """Run doveadm against this instance (e.g. ``doveadm("save", "-u", addr, stdin=message)``)."""
        result = subprocess.run([DOVEADM, "-c", str(self.conf), *args], input=stdin, capture_output=True)
        if result.returncode != 0:
            raise RuntimeError(f"doveadm {' '.join(args)} failed ({result.returncode}): "
                               f"{result.stderr.decode(errors='replace').strip()}")
        return result.stdout.decode(errors="replace")

    def quota_used_kib(self, address: str) -> int:
        """STORAGE in use for ``address`` in KiB, as ``doveadm quota get`` reports it."""
        for line in self.doveadm("quota", "get", "-u", address).splitlines():
            fields = line.split()
            if "STORAGE" in fields:
                return int(fields[fields.index("STORAGE") + 1])
        raise ValueError(f"no STORAGE line for {address}")

    def fill(self, address: str, size: int) -> None:
        """Put about ``size`` bytes of mail into the mailbox, past the quota if need be (doveadm save would
        refuse), and recalculate the quota so quota-status sees it at once."""
        new = self.maildir(address) / "new"
        path = new / f"{time.time_ns()}.filler{size}.mw-test"
        path.write_bytes(filler_message(address, size))
        os.chown(path, MAIL_UID, MAIL_GID)
        path.chmod(0o600)
        self.doveadm("quota", "recalc", "-u", address)

    def build(self) -> None:
        if self._built:
            return
        if os.geteuid() != 0:
            raise RuntimeError("the private Dovecot runs as root and drops privileges: run the tests as root")
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="mw-dovecot-"))
            self._owns_directory = True
        d = self.workdir
        d.chmod(0o755)
        for sub in ("run", "state", "mail"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chown(d / "mail", MAIL_UID, MAIL_GID)
        (d / "users").write_text("".join(
            f"{u.address}:{{PLAIN}}{u.password}:{MAIL_UID}:{MAIL_GID}::{d}/mail/{u.address}::"
            + (f"userdb_quota_rule=*:storage={u.quota}" if u.quota else "") + "\n"
            for u in self.users))
        policy = "" if self.auth_policy is None else AUTH_POLICY_CONF.format(
            url=self.auth_policy.url, api_header=self.auth_policy.api_header, timeout_ms=self.auth_policy.timeout_ms)
        self.conf.write_text(DOVECOT_CONF.format(d=d, imap_port=self.imap_port, quota_port=self.quota_port,
                                                 overquota=OVERQUOTA, auth_policy=policy))
        for user in self.users:
            maildir = self.maildir(user.address)
            for sub in ("new", "cur", "tmp"):
                (maildir / sub).mkdir(parents=True, exist_ok=True)
            for path in (maildir.parent, maildir, *(maildir / sub for sub in ("new", "cur", "tmp"))):
                os.chown(path, MAIL_UID, MAIL_GID)
                path.chmod(0o700)
        self._built = True

    def start(self, timeout: float = 10.0) -> DovecotInstance:
        self.build()
        with open(self.workdir / "dovecot.stderr", "ab") as log:
            # -F: foreground, so proc is the master; own session so stop() can find every child by its group
            self.proc = subprocess.Popen([DOVECOT, "-F", "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, start_new_session=True)
        try:
            self._wait_ready(timeout)
            if not self._filled:  # doveadm needs the running auth service for its userdb lookups
                for user in self.users:
                    if user.fill:
                        self.fill(user.address, user.fill)
                self._filled = True
        except BaseException:
            self.stop()  # a Dovecot that failed to come up must not outlive the failed start
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the master (it stops its children and exits after ~1.1 s), then make sure nothing of its
        process group is left running, so the ports are free and no stray process outlives the test."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        deadline = time.monotonic() + timeout
        while _group_alive(pgid):
            if time.monotonic() > deadline:
                os.killpg(pgid, signal.SIGKILL)
            time.sleep(0.05)



    def log_text(self) -> str:
        parts = [p.read_text(errors="replace") for p in (self.workdir / "dovecot.stderr",
                                                         self.workdir / "dovecot.log") if p.exists()]
        return "\n".join(parts)



    def _wait_ready(self, timeout: float) -> None:
        """Ready = the IMAP greeting was read and quota-status answered a real policy request. A bare
        connect-and-close is no probe: Dovecot logs it as a client that "disconnected before auth was ready"."""
        assert self.proc
        deadline = time.monotonic() + timeout
        probe = self.users[0].address
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dovecot exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            try:
                if _imap_greeting(self.imap_port).startswith(b"* OK") and self.quota_status(probe):
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        raise TimeoutError(f"dovecot not ready after {timeout}s: {self.log_text()[-2000:]}")


def imap_login(port: int, user: str, password: str, originating_ip: str | None = None,
               timeout: float = 10.0) -> tuple[bool, str]:
    """Log in over IMAP as a proxy would: with ``originating_ip``, an IMAP ID ``x-originating-ip`` first
    (believed because loopback is in login_trusted_networks). (logged in, the server's words)."""
    import imaplib

    client = imaplib.IMAP4("127.0.0.1", port, timeout=timeout)
    try:
        if originating_ip:
            imaplib.Commands.setdefault("ID", ("NONAUTH", "AUTH", "SELECTED"))
            client._simple_command("ID", f'("x-originating-ip" "{originating_ip}" "x-originating-port" "50123" '
                                         '"x-connected-ip" "127.0.0.1")')
        try:
            typ, data = client.login(user, password)
        except imaplib.IMAP4.error as exc:
            return False, str(exc)
        client.logout()
        return typ == "OK", b" ".join(d for d in data if isinstance(d, bytes)).decode(errors="replace")
    finally:
        with contextlib.suppress(OSError):
            client.shutdown()


def _imap_greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        greeting = sock.recv(4096)
        if greeting.startswith(b"* OK"):
            sock.sendall(b"a LOGOUT\r\n")
            sock.recv(4096)
        return greeting


def _group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process is left in the group. Zombies are not counted: the master's
    exited children are reparented to PID 1, which may take seconds to reap them, and they hold nothing."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid pgrp ...": comm may contain spaces, so split after the last ')'
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue
        if int(pgrp) == pgid and state not in ("Z", "X"):
            return True
    return False


def start_dovecot(directory: Path | None = None) -> DovecotInstance:
    return DovecotInstance(directory).start()
