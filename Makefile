# The README's two commands. Each creates the virtual environment if it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# One stamp per checkout: the editable install points at a checkout's folders, so a virtual
# environment reused from another checkout (e.g. CI's cached one) is installed again for this one.
STAMP := $(VENV)/.raylm-installed-$(shell echo '$(CURDIR)' | sha256sum | cut -c1-12)

.PHONY: demo test test-fast install clean

$(STAMP): pyproject.toml scripts/install.sh
	VENV=$(VENV) PYTHON=$(PYTHON) bash scripts/install.sh
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/raylm run examples/laptop.yaml

# Two pytest workers, one test file each at a time (--dist loadfile keeps a module's shared engine
# or cluster in one process): the tests wait on engine starts, Ray start-ups and subprocesses as much
# as they compute, so two at a time fill the 2-core machine's idle time.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -x -q -ra --durations=30 -n $(TEST_WORKERS) --dist loadfile tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -x -q -ra -m "not slow" -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf $(VENV) out
