"""Recipients who opted out of greylisting, from an SQL table.

Asked at most once per recipient and cache_ttl (an in-memory cache: opt-outs change rarely), in a worker
thread with a time bound. A table that cannot be read means "not opted out" (greylisting goes on as
usual), logged at most once a minute: it must never stop mail.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time

from mailwarden.directory import SqlQuery
from mailwarden.inline import bounded
from mailwarden.logs import get_logger, log_kv
from mailwarden.section import Section
from mailwarden.units import Duration


class OptOutSqlSettings(Section):
    url: str
    """SQLAlchemy URL, e.g. "mysql+pymysql://mailwarden:secret@db.example.org/mail"."""
    query: SqlQuery = "SELECT 1 FROM greylist_opt_out WHERE address = :address"
    """Returns a row when the recipient opted out. Parameters: :address, :local, :domain."""
    timeout: Duration = 1.0
    cache_ttl: Duration = 300
    """Answers are kept in memory this long (opt-outs change rarely; the table is not asked per message)."""


log = get_logger("policyd.optout")


class SqlOptOut:
    def __init__(self, settings: OptOutSqlSettings) -> None:
        from sqlalchemy import create_engine, text

        self.settings = settings
        self.engine = create_engine(settings.url, pool_pre_ping=True, pool_size=2)
        self.query = text(settings.query)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="optout")
        self.cache: dict[str, tuple[float, bool]] = {}
        self._last_error_log = 0.0

    def _ask(self, address: str) -> bool:
        local, _, domain = address.rpartition("@")
        with self.engine.connect() as conn:
            return conn.execute(self.query, {"address": address, "local": local, "domain": domain}).first() is not None

    async def opted_out(self, recipient: str) -> bool:
        address = recipient.strip().lower()
        now = time.monotonic()
        if (kept := self.cache.get(address)) is not None and kept[0] > now:
            return kept[1]
        loop = asyncio.get_running_loop()
        try:
            answer = await bounded(loop.run_in_executor(self.pool, self._ask, address),
                                            self.settings.timeout)
        except Exception as exc:  # any database trouble: greylist as usual, say so now and then
            if now - self._last_error_log > 60:
                self._last_error_log = now
                log_kv(log, logging.ERROR, "greylist opt-out table unreadable; greylisting as usual",
                       error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
            return False
        if len(self.cache) > 100_000:
            self.cache.clear()
        self.cache[address] = (now + self.settings.cache_ttl, answer)
        return answer

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.engine.dispose()
