"""A private Postfix instance on loopback (needs root and Debian's postfix package).

Its own config, queue, data directory and log file; smtpd on a loopback port, wired to a policy service
with check_policy_service, relaying everything to an SMTP sink. Usable from tests (PostfixInstance) and
from the command line for the quick start (``python tests/harness/postfix.py start DIR ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-{name}
myhostname = {name}.localdomain
mydomain = localdomain
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
local_recipient_maps =
local_transport = error:local delivery disabled
alias_maps =
alias_database =
relay_domains = {relay_domains}
relayhost = [127.0.0.1]:{sink_port}
smtp_dns_support_level = disabled
smtp_host_lookup = native
smtpd_peername_lookup = no
biff = no
maillog_file_prefixes = {d}
maillog_file = {d}/maillog
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
# tests present client addresses and SASL logins with XCLIENT
smtpd_authorized_xclient_hosts = 127.0.0.1
smtpd_sasl_auth_enable = yes
# --- mailwarden policyd: the lines the README tells operators to add ---
smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination
smtpd_recipient_restrictions = {policy}
    permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination
smtpd_data_restrictions = {policy}
smtpd_end_of_data_restrictions = {policy}
smtpd_policy_service_default_action = 451 4.3.5 Policy service unavailable
# --- mailwarden milters: the lines the README tells operators to add ---
smtpd_milters = {milters}
non_smtpd_milters =
# a milter that cannot be reached or dies mid-message: the client is told 451 and retries, nothing is lost
milter_default_action = tempfail
milter_protocol = 6
milter_connect_macros = j {{daemon_name}} {{daemon_addr}} v _ {{client_addr}} {{client_name}}
milter_mail_macros = i {{auth_type}} {{auth_authen}} {{auth_author}} {{mail_addr}} {{mail_host}} {{mail_mailer}}
    {{client_addr}}
"""

README = Path(__file__).resolve().parents[2] / "README.md"


def documented_reinject_listener(port: int) -> str:
    """The quarantine's re-injection listener exactly as README.md's "Quarantine" section documents it for
    master.cf (no milters, no policy service), on ``port``: the tests run the lines the operators copy."""
    section = README.read_text().split("## Quarantine", 1)[1]
    block = re.search(r"in `master.cf`.*?```\n(.*?)```", section, re.DOTALL)
    if block is None:
        raise RuntimeError("README.md: no master.cf block in the Quarantine section")
    return block.group(1).replace("127.0.0.1:10026", f"127.0.0.1:{port}")

def documented_digest_reply(directory: Path, command: str, user: str, reply_mailbox: str) -> tuple[str, str]:
    """The reply handler's pipe transport exactly as README.md's "Replies to digests" section documents it:
    (master.cf lines, main.cf lines), with the command, the user and the reply mailbox of the test, and
    the transport map written as a texthash file in ``directory`` (no postmap needed)."""
    section = README.read_text().split("### Replies to digests", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```\n(.*?)```", section, re.DOTALL)
    master = next(block for block in blocks if " pipe\n" in block)
    main = next(block for block in blocks if "transport_maps" in block)
    transport = next(block for block in blocks if "/etc/postfix/transport:" in block)
    master = master.replace("/opt/mailwarden/bin/mailwarden", command).replace("user=mailwarden", f"user={user}")
    path = directory / "transport"
    path.write_text(transport.replace("quarantine@example.org", reply_mailbox))
    main = main.replace("hash:/etc/postfix/transport", f"texthash:{path}")
    return master, main


MASTER_CF = """\
127.0.0.1:{smtp_port} inet n - n - - smtpd
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
verify     unix  -       -       n       -       1       verify
flush      unix  n       -       n       1000?   0       flush
proxymap   unix  -       -       n       -       -       proxymap
proxywrite unix  -       -       n       -       1       proxymap
smtp       unix  -       -       n       -       -       smtp
relay      unix  -       -       n       -       -       smtp
showq      unix  n       -       n       -       -       showq
error      unix  -       -       n       -       -       error
retry      unix  -       -       n       -       -       error
discard    unix  -       -       n       -       -       discard
local      unix  -       n       n       -       -       local
anvil      unix  -       -       n       -       1       anvil
scache     unix  -       -       n       -       1       scache
postlog    unix-dgram n  -       n       -       1       postlogd
"""


def policy_restriction(policy_port: int | None) -> str:
    if not policy_port:
        return ""
    return f"check_policy_service {{ inet:127.0.0.1:{policy_port}, timeout=10s, default_action=DUNNO }},"


@dataclass
class PostfixInstance:
    directory: Path
    smtp_port: int
    sink_port: int
    policy_port: int | None
    relay_domains: str = "example.test"
    milters: str = ""
    """smtpd_milters, e.g. ``inet:127.0.0.1:10030``; empty for none."""
    reinject_port: int | None = None
    """A second smtpd on this port that skips milters and policy (the quarantine's re-injection)."""
    extra_main_cf: str = ""
    """Lines appended to main.cf (a later line wins over the one above), e.g. ``message_size_limit = 0``."""
    extra_master_cf: str = ""
    """Lines appended to master.cf (a pipe transport ...)."""

    @property
    def conf(self) -> Path:
        return self.directory / "conf"

    @property
    def maillog(self) -> Path:
        return self.directory / "maillog"

    def write(self) -> None:
        d = self.directory
        for sub in ("conf", "queue", "data"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(d / "data", "postfix")
        name = f"mw{self.smtp_port}"
        policy = policy_restriction(self.policy_port)
        (self.conf / "main.cf").write_text(MAIN_CF.format(d=d, name=name, sink_port=self.sink_port,
                                                          relay_domains=self.relay_domains, policy=policy,
                                                          milters=self.milters)
                                          + self.extra_main_cf)
        master = MASTER_CF.format(smtp_port=self.smtp_port)
        if self.reinject_port:
            master += documented_reinject_listener(self.reinject_port)
        master += self.extra_master_cf
        (self.conf / "master.cf").write_text(master)
        self._postfix("check")

    def start(self) -> PostfixInstance:
        self.write()
        self._postfix("start")
        return self

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], capture_output=True, check=False)
        pid_file = self.directory / "queue" / "pid" / "master.pid"
        deadline = time.monotonic() + 10
        while pid_file.exists() and time.monotonic() < deadline:
            try:
                os.kill(int(pid_file.read_text().split()[0]), 0)
            except (OSError, ValueError):
                break
            time.sleep(0.05)

    def queue(self) -> list[dict]:
        out = subprocess.run(["postqueue", "-c", str(self.conf), "-j"], capture_output=True, text=True, check=True)
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    def flush(self) -> None:
        """postqueue -f: try every queued message now (Postfix itself retries after its backoff; a deferral
        can also leave a message in the incoming queue with a future time stamp, which only a flush or a new
        arrival rescans)."""
        subprocess.run(["postqueue", "-c", str(self.conf), "-f"], capture_output=True, check=True)

    def log_text(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def _postfix(self, command: str) -> None:
        result = subprocess.run(["postfix", "-c", str(self.conf), command], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"postfix {command} failed: {result.stderr.strip()}\n{self.log_text()[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Start or stop a private Postfix instance on loopback.")
    parser.add_argument("command", choices=["start", "stop"])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--smtp-port", type=int, default=2525)
    parser.add_argument("--sink-port", type=int, default=2500)
    parser.add_argument("--policy-port", type=int, default=10023)
    parser.add_argument("--relay-domains", default="example.test")
    parser.add_argument("--milters", default="", help="smtpd_milters, e.g. inet:127.0.0.1:10030")
    parser.add_argument("--reinject-port", type=int, default=None)
    parser.add_argument("--digest-reply-command", default=None,
                        help="route --reply-mailbox to this command through README's pipe transport")
    parser.add_argument("--digest-reply-user", default="nobody")
    parser.add_argument("--reply-mailbox", default="quarantine@example.test")
    args = parser.parse_args()
    master = main_cf = ""
    if args.digest_reply_command and args.command == "start":
        master, main_cf = documented_digest_reply(args.directory.resolve(), args.digest_reply_command,
                                                  args.digest_reply_user, args.reply_mailbox)
    instance = PostfixInstance(args.directory.resolve(), args.smtp_port, args.sink_port, args.policy_port,
                               args.relay_domains, args.milters, args.reinject_port, extra_main_cf=main_cf,
                               extra_master_cf=master)
    if args.command == "start":
        instance.start()
        print(f"postfix listening on 127.0.0.1:{args.smtp_port}, log {instance.maillog}")
    else:
        instance.stop()


if __name__ == "__main__":
    main()
