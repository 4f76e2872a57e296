"""Fault injection for crash tests: COMPTRUST_FAILPOINT=NAME@K kills this process (SIGKILL) the K-th time the
code passes the failpoint NAME. Unset (always, outside tests), a failpoint costs one dict lookup.

Failpoints sit where a crash is most dangerous: inside the store's transactions, after the rows are written and
before they are committed, so the tests can prove that SQLite's atomic commit leaves no partial rows.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_passes: Counter = Counter()


def failpoint(name: str) -> None:
    spec = os.environ.get("COMPTRUST_FAILPOINT")
    if not spec:
        return
    target, _, k = spec.partition("@")
    if target != name:
        return
    _passes[name] += 1
    if _passes[name] == int(k or 1):
        os.kill(os.getpid(), signal.SIGKILL)
