"""The README's notebook example: evaluate, compress, run a tiny study, print a DataFrame (python examples/notebook.py)."""
import comptrust

# 1. the embedded SmolLM2-135M on one perspective of the built-in mini suite (1 item per sub-scenario)
r = comptrust.evaluate(perspectives=["ethics"], out="runs/nb-eval", limit=1)
print("ethics:", r.score("ethics"), "refusals:", r.perspectives["ethics"].refusal_rate, "config", r.config_fingerprint)

# 2. compress it: 8-bit round-to-nearest (no calibration data, seconds); the folder is a model= for evaluate
ck = comptrust.compress(method="rtn", bits=8, out="runs/nb-rtn-w8")
ppl = ck.record["checks"]["perplexity"]
print("compressed:", ck.label, f"held-out perplexity {ppl['before']:.2f} -> {ppl['after']:.2f}")

# 3. a tiny study: dense vs 8-bit RTN, two perspectives, a dict with the study file's keys
study = comptrust.run_study(
    {"variants": ["dense", {"method": "rtn", "bits": 8}], "perspectives": ["ethics", "stereotype"],
     "limit": 1, "bootstrap": 50},
    out="runs/nb-study",
)
df = study.to_pandas()  # one row per variant, seed and perspective
print(df[["variant", "seed", "perspective", "score", "ci_low", "ci_high", "refusal_rate", "n_items"]])
print(study.recommendation.text)
