# make test: create .venv when missing, install spotguard with its test extras, run the suite.
# constraints.txt pins every package: without it pip's resolver spends minutes
# walking boto3/botocore releases to satisfy aiobotocore's narrow botocore pin.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test install bench bench-detect demo clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

# Figures for docs/benchmarks.md: machine.step, poll rounds, notice latency, memory.
bench: $(STAMP)
	$(PY) bench/run.py

# Notice appears → StartInstances, 30 trials per path (SQS, agent, poll), into docs/benchmarks.md.
bench-detect: $(STAMP)
	$(PY) bench/detect.py

# One spot interruption on an embedded AWS, with spotguard and without a standby.
demo: $(STAMP)
	$(PY) -m spotguard demo --compare

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
