# The two commands the README promises: `make demo` and `make test`.
# Each builds .venv (and installs the local services tests need) on a fresh machine.

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
	bash infra/install-services.sh
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check flows tasks schemas tests bench

clean:
	rm -rf $(VENV) radrepo-demo .pytest_cache
