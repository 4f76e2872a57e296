"""Record the progress events of one `comptrust evaluate` run and the ETA shown at each of them.

Usage: python eta_trace.py OUT_JSON [evaluate kwargs as key=value ...]
Writes {"events": [[t, kind, args, done, eta], ...], "t_end": ...}; t is seconds since the bar started.
The ETA error at 30 s / 60 s is then (t + eta) - t_end, computed by eta_error.py.
"""

import json
import sys
import time

import comptrust
from comptrust import progress

events: list = []
T0 = [None]


def wrap(name):
    orig = getattr(progress.GenerationProgress, name)

    def f(self, *a, **k):
        r = orig(self, *a, **k)
        now = time.time()
        if name == "start" and T0[0] is None:
            T0[0] = now
        if T0[0] is not None:
            events.append([round(now - T0[0], 3), name, list(a), round(self.done + self.partial, 3), self.eta()])
        return r

    setattr(progress.GenerationProgress, name, f)


for n in ("start", "batch", "step", "advance", "commit", "stop"):
    wrap(n)

out = sys.argv[1]
kw = dict(a.split("=", 1) for a in sys.argv[2:])
kw.setdefault("perspectives", "all")
kw["limit"] = int(kw.get("limit", 1))
t_start = time.time()
comptrust.evaluate(out=kw.pop("out", "/tmp/eta_trace_run"), progress=False if kw.pop("quiet", "") else None, **kw)
stop = [e[0] for e in events if e[1] == "stop"]
json.dump({"events": events, "t_end": stop[-1] if stop else None, "t_bar_start": T0[0] - t_start}, open(out, "w"))
