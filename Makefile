# The two set-up commands of the README. Both create/reuse .venv and install everything first.
.PHONY: demo test bench clean

OUT ?= runs/demo
# The suite's settings (pyproject.toml [tool.pytest.ini_options] holds the rest). Two pytest-xdist workers, one
# test module per worker (loadscope keeps a module's shared fixtures, e.g. a study built once, on one worker;
# loadgroup does not group under pytest 9.2 + xdist 3.8). From nothing on 2 cores: suite 543-828 s, 709-1,035 s with
# set-up (bench/results/test_timing.md). PYTEST_ARGS=-q runs one process; --durations shows where the time went.
PYTEST_ARGS ?= -q -n 2 --dist loadscope --durations=25

demo:  ## install, then run the main job on the embedded model and the built-in mini suites
	bash scripts/setup.sh
	.venv/bin/comptrust evaluate --perspectives all --out $(OUT)

# pytest's exit 5 (it collected no test, e.g. a -k that matches nothing) is reported, not treated as a failure.
test:  ## install (with test extras), then run the test suite; prints the time each part took
	@t0=$$(date +%s); COMPTRUST_EXTRAS=",test,ray,track" bash scripts/setup.sh || exit $$?; \
	t1=$$(date +%s); echo "set-up: $$((t1 - t0)) s"; \
	.venv/bin/ruff check src || exit $$?; .venv/bin/mypy || exit $$?; echo "lint (ruff) and types (mypy): clean"; \
	.venv/bin/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	t2=$$(date +%s); echo "test suite: $$((t2 - t1)) s (set-up + suite $$((t2 - t0)) s, load $$(cut -d' ' -f1-3 /proc/loadavg))"; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5)"; rc=0; fi; exit $$rc

bench:
	.venv/bin/python bench/generation.py

clean:
	rm -rf runs .pytest_cache
