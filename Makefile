# The two set-up commands of the README. Both create/reuse .venv and install everything first.
.PHONY: demo test bench clean

OUT ?= runs/demo

demo:  ## install, then run the main job on the embedded model and the built-in mini suites
	bash scripts/setup.sh
	.venv/bin/comptrust evaluate --perspectives all --out $(OUT)

test:  ## install (with test extras), then run the test suite
	COMPTRUST_EXTRAS=",test,ray" bash scripts/setup.sh
	.venv/bin/python -m pytest -q

bench:
	.venv/bin/python bench/generation.py

clean:
	rm -rf runs .pytest_cache
