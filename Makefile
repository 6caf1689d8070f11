# make demo   install, start local Prefect + MLflow servers, run the pipeline on the embedded pydoc site
# make test   install with test extras and the Debian packages the tests need, run the test suite
# make docs   serve the documentation site on http://127.0.0.1:8000 (make docs-build: strict build into site/)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PREFECT_PORT ?= 4200
MLFLOW_PORT  ?= 5000
SERVICES_ENV := PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api MLFLOW_TRACKING_URI=http://127.0.0.1:$(MLFLOW_PORT)

.PHONY: install system-deps demo test docs docs-build services stop clean bench-datatrove-env

install: $(VENV)/.installed

# torch first, alone, pinned: `pip install torch==2.13.0` takes the local CPU build here.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

services: install
	PREFECT_PORT=$(PREFECT_PORT) MLFLOW_PORT=$(MLFLOW_PORT) $(BIN)/python -m infra.services start

demo: services
	$(SERVICES_ENV) $(BIN)/ssl-pipeline run --config flows/profiles/demo.yaml

# the Debian packages the tests need (chromium, postgresql, python3-doc, ...): installed as root,
# otherwise listed before any test runs
system-deps:
	@infra/system-deps.sh

test: install system-deps
	$(BIN)/python -m pytest

# the docs' reference pages are generated from the code at build time (docs/hooks.py); mkdocs and
# mkdocs-material come with the test extra (and the docs extra)
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8000

docs-build: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

stop:
	$(BIN)/python -m infra.services stop

# datatrove for bench/datatrove_compare.py only, in a virtual environment of its own
bench-datatrove-env:
	$(PYTHON) -m venv bench/.venv-datatrove
	bench/.venv-datatrove/bin/pip install --quiet "datatrove[io]==0.10.1" "nltk==3.10.4" "spacy==3.8.18" \
		"xxhash==3.8.2" tokenizers regex

clean: stop
	rm -rf runs .ssl site
