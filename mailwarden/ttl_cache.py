"""A thread-safe cache of values by key for a time, for lookups that many threads repeat (a recipient's
spam preferences, its mailbox): least recently stored keys go first when it is full, and a write
elsewhere invalidates its key without a stale read in flight putting the old value back."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")
MISSING = object()
"""What ``get`` returns for a key it does not hold (None may be a value)."""


class TtlCache(Generic[V]):
    """Owner -> value for ``ttl`` seconds. ``generation`` counts invalidations: a value read from the
    database is kept only if no write came between the read's start and its ``put`` (else it may be the
    value from before the write)."""

    def __init__(self, ttl: float, now: Callable[[], float], max_owners: int = 100_000) -> None:
        self.ttl, self.now, self.max_owners = ttl, now, max_owners
        self.lock = threading.Lock()
        self.values: OrderedDict[str, tuple[float, V]] = OrderedDict()
        self.generation = 0

    def get(self, owner: str) -> V | object:
        with self.lock:
            found = self.values.get(owner)
            if found is None:
                return MISSING
            if found[0] <= self.now():
                del self.values[owner]
                return MISSING
            return found[1]

    def put(self, values: dict[str, V], generation: int) -> None:
        with self.lock:
            if generation != self.generation or self.ttl <= 0:
                return
            expires = self.now() + self.ttl
            for owner, value in values.items():
                self.values[owner] = (expires, value)
                self.values.move_to_end(owner)
            while len(self.values) > self.max_owners:
                self.values.popitem(last=False)

    def invalidate(self, owner: str) -> None:
        with self.lock:
            self.generation += 1
            self.values.pop(owner, None)
