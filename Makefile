# make test: create .venv when missing, install spotguard with its test extras, run the suite.
# constraints.txt pins every package: without it pip's resolver spends minutes
# walking boto3/botocore releases to satisfy aiobotocore's narrow botocore pin.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test lint install bench bench-detect bench-readiness bench-simulate demo clean reliability

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

test: lint
	$(PY) -m pytest -q -n 4

# ruff: pyflakes, pycodestyle and import order over everything Python in the tree.
lint: $(STAMP)
	$(PY) -m ruff check spotguard tests bench

# Issue 7's figures into docs/benchmarks.md (~6 min on an idle 2-core machine): steady memory/CPU/AWS calls for 1 and 20 guards
# beside a bare-aiobotocore floor, growth over 10,000 polls, start-up, reaction, poll rounds, machine.step.
bench: $(STAMP)
	$(PY) bench/run.py

# Notice appears → StartInstances, 30 trials per path (SQS, agent, poll), into docs/benchmarks.md.
bench-detect: $(STAMP)
	$(PY) bench/detect.py

# A failover at AWS's default health-check settings, register_when ready against running, into docs/benchmarks.md.
bench-readiness: $(STAMP)
	$(PY) bench/readiness.py

# `spotguard simulate --trace all` timed as users run it (goal: under 5 s), into docs/benchmarks.md.
bench-simulate: $(STAMP)
	$(PY) bench/simulate.py

# One spot interruption on an embedded AWS, with spotguard and without a standby.
demo: $(STAMP)
	$(PY) -m spotguard demo --compare

# docs/reliability.md: regenerated from the tests, with the figures of a long soak (SOAK_STEPS steps).
SOAK_STEPS ?= 5000
reliability: $(STAMP)
	SPOTGUARD_SOAK_STEPS=$(SOAK_STEPS) SPOTGUARD_SOAK_REPORT=.soak-report.json $(PY) -m pytest -q -p no:cacheprovider tests/test_soak.py
	$(PY) tests/reliability.py --soak .soak-report.json
	rm -f .soak-report.json

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
