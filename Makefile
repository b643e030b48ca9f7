# make test: create .venv when missing, install spotguard with its test extras, run the suite.
# constraints-dev.txt (which includes constraints.txt, the production pins) pins every package: without it
# pip's resolver spends minutes walking boto3/botocore releases to satisfy aiobotocore's narrow botocore pin.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test lint install bench bench-detect bench-readiness bench-simulate demo clean reliability package-check test-lower

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt constraints-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints-dev.txt -e '.[dev]'
	touch $@

test: lint
	$(PY) -m pytest -q -n 4

# What a user installs: the sdist and the wheel built from nothing (pyproject's build-system), their contents
# checked (tests/test_packaging.py), the wheel installed by pip into a fresh venv with constraints.txt alone as
# docs/install.md says, its command run; then a few tests run from the unpacked sdist, helpers and data included.
DIST       ?= /tmp/spotguard-dist
CHECK_VENV ?= /tmp/spotguard-package-check
SDIST_TESTS := tests/test_layout.py tests/test_machine.py tests/test_docs.py tests/test_systemd.py \
	tests/test_events.py::test_every_sample_has_an_expected_outcome_and_every_kind_is_covered \
	tests/test_events.py::test_a_sample_is_read_as_expected

package-check: $(STAMP)
	rm -rf $(DIST) $(CHECK_VENV)
	$(PY) -m build -q -o $(DIST) . >/dev/null
	SPOTGUARD_DIST=$(DIST) $(PY) -m pytest -q -p no:cacheprovider tests/test_packaging.py
	$(PYTHON) -m venv $(CHECK_VENV)
	$(CHECK_VENV)/bin/pip install -q --disable-pip-version-check -c constraints.txt $(DIST)/spotguard-*.whl
	$(CHECK_VENV)/bin/spotguard --version
	$(CHECK_VENV)/bin/spotguard check-config --config config.example.toml
	tar -xzf $(DIST)/spotguard-*.tar.gz -C $(DIST)
	cd $(DIST)/spotguard-*/ && $(abspath $(PY)) -m pytest -q -p no:cacheprovider $(SDIST_TESTS)

# pyproject's lower bounds, each pinned exactly (tests/test_packaging.py --lower-bounds), installed together and
# tested; the test tools and moto at their dev pins, the rest resolved fresh. uv installs them (seconds, where
# pip spends a minute reading botocore's and aiohttp's release lists). The tests: the core (machine, config) and
# those that drive each dependency (structlog: logs; discord-webhook: notify; prometheus-client: metrics;
# apscheduler: summary; aiobotocore, botocore and its aiohttp: aws, model, sqs, executor), ~35 s on 2 cores.
# Two tests assert the pinned botocore's exact output (its user-agent version, the lean model regenerated from
# it) and are left out here.
LOWER_VENV  ?= /tmp/spotguard-lower
LOWER_TESTS := tests/test_machine.py tests/test_config.py tests/test_logs.py tests/test_notify.py tests/test_metrics.py \
	tests/test_summary.py tests/test_aws.py tests/test_model.py tests/test_sqs.py tests/test_executor.py
LOWER_SKIP  := --deselect tests/test_aws.py::test_every_request_names_spotguard_in_botocores_user_agent \
	--deselect tests/test_model.py::test_shipped_file_is_what_the_installed_botocore_gives

test-lower: $(STAMP)
	rm -rf $(LOWER_VENV)
	$(VENV)/bin/uv venv -q -p $(PYTHON) $(LOWER_VENV)
	$(PY) tests/test_packaging.py --lower-bounds > $(LOWER_VENV)/lower-bounds.txt
	grep -v '^-c' constraints-dev.txt > $(LOWER_VENV)/tools.txt
	$(VENV)/bin/uv pip install -q --python $(LOWER_VENV)/bin/python \
		-c $(LOWER_VENV)/lower-bounds.txt -c $(LOWER_VENV)/tools.txt '.[dev]'
	$(LOWER_VENV)/bin/python -m pytest -q -p no:cacheprovider -n 2 $(LOWER_TESTS) $(LOWER_SKIP)

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
