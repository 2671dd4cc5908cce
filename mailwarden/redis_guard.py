"""A guard: reads of one caller carried by another caller's script, so that both cost one Redis round trip.

policyd's default checks each need Redis: the block list reads a few keys, the greylist (or the rate limit)
runs a script. One after the other that is two round trips per request, and a round trip is most of what a
check costs in CPU on our side (../shared/PERF-NOTES.md). A guard lets the second ride on the first
without giving up the order of the checks: the script first reads the guard's keys and compares each with
what the guarding caller expects (for the block list: no block for this user or client, and the list of
blocked network sizes it last saw). When all hold, the script runs as if the guard were not there; when
one differs, the script does nothing at all and returns what the keys hold, so that the guarding caller
can judge as if it had read them itself (and the script's caller runs its script again if it still
should). Every script is loaded twice: as written and behind the guard prelude.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GUARD_TRIPPED = b"__guard__"
"""First element of the reply of a guarded script that did not run because a guard key differed."""

PRELUDE = """\
-- Guard prelude (mailwarden/redis_guard.py). ARGV[1] = g, the number of guard keys: KEYS[1..g].
-- ARGV[2..g+1] say what each must hold: '' for nothing, '=' .. value for that value. When one holds anything
-- else the script below does not run: the reply is {'__guard__', the value of each guard key}. Otherwise it
-- runs with KEYS and ARGV as its caller would have passed them without a guard.
local guard_size = tonumber(ARGV[1])
local guard_found = redis.call('MGET', unpack(KEYS, 1, guard_size))
for guard_i = 1, guard_size do
  local want, got = ARGV[guard_i + 1], guard_found[guard_i]
  if (want == '' and got) or (want ~= '' and got ~= string.sub(want, 2)) then
    table.insert(guard_found, 1, '__guard__')
    return guard_found
  end
end
local KEYS, ARGV = {unpack(KEYS, guard_size + 1)}, {unpack(ARGV, guard_size + 2)}
"""


def guarded_source(source: str) -> str:
    """A script's source behind the guard prelude (its KEYS and ARGV are rebound to its own)."""
    return PRELUDE + source


@dataclass(slots=True)
class Guard:
    """Keys one caller needs read, with what it expects of each (None: the key does not exist).

    ``context`` is the guarding caller's own (what it needs to judge the values once read)."""

    keys: list[str]
    expected: list[bytes | None]
    context: object = None
    args: list[bytes] = field(init=False)
    """``expected`` as the prelude reads it."""

    def __post_init__(self) -> None:
        self.args = [b"" if value is None else b"=" + value for value in self.expected]

    @classmethod
    def combine(cls, guards: list[Guard]) -> Guard:
        """One guard for the reads of several callers; the values come back in the same order."""
        if len(guards) == 1:
            return guards[0]
        return cls([key for guard in guards for key in guard.keys],
                   [value for guard in guards for value in guard.expected])


class GuardTripped(Exception):
    """The guarded script did not run: a guard key held something else than expected. ``found`` holds every
    guard key's value, in the guard's order."""

    def __init__(self, found: list[bytes | None]) -> None:
        super().__init__("a guard key changed; the script did not run")
        self.found = found


def unguarded(reply: object) -> object:
    """The reply of a guarded script, or GuardTripped when the guard stopped it (call on every reply of a
    script run with a guard; a reply without one passes through)."""
    if type(reply) is list and reply and reply[0] == GUARD_TRIPPED:
        raise GuardTripped(reply[1:])
    return reply
