# The two set-up commands of the README: `make demo` and `make test`.
# Both create (or reuse) the project-local virtualenv .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: demo test lint bench browser install

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip uv
	$(VENV)/bin/uv pip install --python $(PY) -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/flywheel demo

# Headless Chromium for the browser-snippet and dashboard tests (Debian's packages);
# where it cannot be installed those tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) ; } \
	  || echo "note: chromium not installed; browser tests will skip"

# The import contracts of pyproject.toml (the layers), then the whole suite, in TEST_WORKERS
# pytest-xdist workers (most tests wait on subprocesses, servers and outages; 0: in one process).
TEST_WORKERS ?= 3
test: $(STAMP) browser
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# The benchmarks compare with Langfuse and OpenInference: the `bench` extra on top of `dev`.
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(VENV)/bin/uv pip install --python $(PY) -q -e '.[dev,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	for f in benchmarks/*.py; do $(PY) $$f || exit 1; done
