"""Mail the quarantine writes itself (digests, confirmations of replies, previews, the admin copy), sent
through a Postfix listener that skips the milters (``[quarantine.digest] submit``, else ``[quarantine]
reinject``): a digest lists spam subjects and senders, and must not be scored as spam itself.

One SMTP connection serves many messages (a run of 10,000 digests opens one, not 10,000); a connection the
listener closed meanwhile is opened again once. The envelope sender is null by default: these are
automatic messages (RFC 3834), and a bounce of one must not come back to anyone.
"""

from __future__ import annotations

import contextlib
import smtplib
from email.message import EmailMessage
from types import TracebackType

from quarantine.release import QUEUED_AS
from quarantine.store import QuarantineSettings, split_host_port


class OutboxError(Exception):
    """The listener could not be reached or refused the message: it was not sent (the message says why)."""


class Outbox:
    def __init__(self, settings: QuarantineSettings) -> None:
        digest = settings.digest
        address = (digest.submit if digest and digest.submit else None) or settings.reinject
        self._open(address, settings.reinject_timeout, "[quarantine.digest] submit, else [quarantine] reinject")

    @classmethod
    def to_listener(cls, address: str, timeout: float, configured_by: str) -> Outbox:
        """An outbox for another capability's mail (phishhook's tickets): ``address`` is host:port,
        ``configured_by`` names the setting, for the error that says what to fix."""
        outbox = cls.__new__(cls)
        outbox._open(address, timeout, configured_by)
        return outbox

    def _open(self, address: str, timeout: float, configured_by: str) -> None:
        self.address = address
        self.host, self.port = split_host_port(address)
        self.timeout = timeout
        self.configured_by = configured_by
        self._smtp: _RecordingSMTP | None = None

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def send(self, message: EmailMessage, recipient: str, sender: str = "") -> str:
        """Send ``message`` to ``recipient``; returns the queue id Postfix gave it ("" if its reply named
        none). Raises OutboxError when it was not sent."""
        data = message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
        for attempt in (1, 2):
            try:
                smtp = self._connection()
                options = ["SMTPUTF8"] if not (sender + recipient).isascii() and smtp.has_extn("smtputf8") else []
                if smtp.has_extn("8bitmime"):
                    options.append("BODY=8BITMIME")
                smtp.sendmail(sender, [recipient], data, mail_options=options)
                match = QUEUED_AS.search(smtp.last_data_reply)
                return match.group(1).decode("ascii") if match else ""
            except smtplib.SMTPServerDisconnected as exc:
                self.close()
                if attempt == 2:
                    raise OutboxError(f"the listener at {self.address} closed the connection: {exc}") from None
            except smtplib.SMTPRecipientsRefused as exc:
                [(code, reply_text)] = exc.recipients.values()
                self._reset()
                raise OutboxError(f"the listener at {self.address} refused {recipient}: {code} "
                                  f"{reply_text.decode('utf-8', 'replace')}") from None
            except smtplib.SMTPResponseException as exc:
                self._reset()
                error = exc.smtp_error.decode("utf-8", "replace") if isinstance(exc.smtp_error, bytes) \
                    else str(exc.smtp_error)
                raise OutboxError(f"the listener at {self.address} answered {exc.smtp_code} {error}") from None
            except (OSError, smtplib.SMTPException) as exc:
                self.close()
                raise OutboxError(f"cannot send through {self.address} ({self.configured_by}): "
                                  f"{getattr(exc, 'strerror', None) or exc}") from None
        raise AssertionError("unreachable")

    def _connection(self) -> _RecordingSMTP:
        if self._smtp is None:
            smtp = _RecordingSMTP(self.host, self.port, timeout=self.timeout)
            smtp.ehlo_or_helo_if_needed()
            self._smtp = smtp
        return self._smtp

    def _reset(self) -> None:
        if self._smtp is not None:
            with contextlib.suppress(OSError, smtplib.SMTPException):
                self._smtp.rset()

    def close(self) -> None:
        if self._smtp is not None:
            with contextlib.suppress(OSError, smtplib.SMTPException):
                self._smtp.quit()
            with contextlib.suppress(OSError):
                self._smtp.close()
            self._smtp = None


class _RecordingSMTP(smtplib.SMTP):
    """smtplib.SMTP keeping the text of the reply to the end of DATA (``sendmail`` drops it)."""

    last_data_reply = b""

    def data(self, msg: bytes | str) -> tuple[int, bytes]:  # type: ignore[override]
        code, text = super().data(msg)
        self.last_data_reply = text
        return code, text
