"""Cross-site request forgery: every form of the review page carries the session's token in a hidden field
(``csrf``), and every POST must bring it back.

The token is random (``secrets.token_urlsafe``), kept in the signed session cookie and compared with
``hmac.compare_digest``. The login form has one too, bound to the session the login page started (a
pre-login session): a login posted from another site, or without the cookie, is refused before any password
is looked at. Logging in starts a new session with a new token, so a token seen before the login is worth
nothing after it. The cookie is also SameSite=Strict, which alone stops most cross-site posts; the token is
the check that does not depend on the browser.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any

FIELD = "csrf"
"""The hidden form field (and session key) of the token."""
TOKEN_BYTES = 32


def token(session: dict[str, Any]) -> str:
    """The session's token, made on first use."""
    current = session.get(FIELD)
    if not isinstance(current, str) or not current:
        current = secrets.token_urlsafe(TOKEN_BYTES)
        session[FIELD] = current
    return current


def valid(session: dict[str, Any], submitted: object) -> bool:
    """Whether ``submitted`` (the form's field) is the session's token. A session without one (no cookie,
    or an expired one) never matches."""
    expected = session.get(FIELD)
    if not isinstance(expected, str) or not expected or not isinstance(submitted, str):
        return False
    return hmac.compare_digest(expected.encode(), submitted.encode())
