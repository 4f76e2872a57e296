"""Replay a trace recorded by eta_trace.py into GenerationProgress with a fake clock: the ETA the old rule (prompts/s)
and the weighted rule (work_of) would have shown at given seconds, as predicted end / actual end."""
import json, sys, time
from comptrust import progress
from comptrust.config import EvalConfig
from comptrust.evaluate import prepare
d = json.load(open(sys.argv[1])); ev = d["events"]; t_end = d["t_end"]
# the old batch() called advance() itself, so the trace holds that advance just before its batch: drop it
ev = [e for i, e in enumerate(ev) if not (e[1] == "advance" and i + 1 < len(ev) and ev[i + 1][1] == "batch"
                                          and ev[i + 1][2] == e[2])]
names = ["toxicity","stereotype","advglue","ood","adv_demo","privacy","ethics","fairness","mmlu"]
p = prepare(names, EvalConfig.build(limit=1).to_options())
segs = [[it.prompt for it in ld.items] for _, ld, _o in p.loaded.values()]
for mode in ("before", "after"):
    clock = [0.0]
    progress.time.time = lambda: clock[0]
    g = progress.GenerationProgress("off")
    g.mode = "x"  # not off: start() runs; _show does nothing for unknown mode
    if mode == "after": g.plan(segs)
    out = {}
    checks = [float(x) for x in sys.argv[2:]] or [15, 30, 45, 60, 90, 120]
    ci = 0
    for t, kind, args, done, _eta in ev:
        while ci < len(checks) and checks[ci] < t:
            clock[0] = checks[ci]
            e = g.eta() if mode == "after" else (lambda r: (g.total - g.done - g.partial) / r if r else None)(g.rate())
            out[checks[ci]] = None if e is None else round((checks[ci] + e) / t_end, 2)
            ci += 1
        clock[0] = t
        if kind == "start":
            g.total = 0; g.start(*args) if g.total == 0 else None
        elif kind == "stop": pass
        else: getattr(g, kind)(*args)
    print(mode, "predicted end / actual end at t=", out, "actual end", t_end)
