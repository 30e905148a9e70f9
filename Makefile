# The two commands the README promises: `make demo` and `make test`.
# Each builds .venv on a fresh machine; `make test` also installs the PACS the tests start
# (Debian's Orthanc, infra/install-services.sh). Tests run their services on 127.0.0.1.

PYTHON ?= python3
VENV   ?= .venv
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/radrepo demo radrepo-demo

test: $(STAMP)
	infra/install-services.sh
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check flows tasks schemas synth tests bench infra

clean:
	rm -rf $(VENV) radrepo-demo .pytest_cache
