# make demo | make test | make bench — each creates .venv (and installs gptjt into it) when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo test test-fast bench clean

# torch is installed first and pinned: on CPU machines this takes the local CPU wheel and
# stops anything from pulling a multi-GB CUDA build; on GPU hosts PyPI's torch is CUDA.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gptjt demo

test: $(STAMP)
	$(PY) -m pytest tests --durations=25

test-fast: $(STAMP)
	$(PY) -m pytest tests/unit

# every benchmark's quick form into bench/results.json, then the READMEs' tables from it (also
# when a benchmark failed: it is recorded and shown as failed, and make still exits non-zero)
bench: $(STAMP)
	$(VENV)/bin/gptjt bench all --quick --json --results bench/results.json; status=$$?; \
	$(PY) -m bench.render && exit $$status

clean:
	rm -rf runs .pytest_cache
