# The two commands the README promises: `make demo` and `make test`.
# Each builds .venv on a fresh machine; tests start their own services on 127.0.0.1.

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
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check flows tasks schemas tests bench

clean:
	rm -rf $(VENV) radrepo-demo .pytest_cache
