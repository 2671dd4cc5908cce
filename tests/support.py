"""Small helpers several test modules share (one copy of each)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import redis

from phishhook import keys


def load_tool(path: Path, name: str) -> ModuleType:
    """A script of tools/ imported as a module (its helpers are what the tests drive)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def age_history(client: redis.Redis, prefix: str, user: str, seconds: float) -> None:
    """Move a user's recorded logins ``seconds`` into the past, as if the next login came that much later
    (phishhook judges it against them; the tests need not wait an hour)."""
    key = keys.user_key(prefix, keys.HISTORY, user)
    entries = [json.loads(raw) for raw in client.lrange(key, 0, -1)]
    assert entries, f"no logins of {user} recorded"
    pipe = client.pipeline()
    pipe.delete(key)
    for entry in entries:
        entry["at"] -= seconds
        pipe.rpush(key, json.dumps(entry))
    pipe.execute()
