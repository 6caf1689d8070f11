# make demo   install, start local Prefect + MLflow servers, run the pipeline on the embedded pydoc site
# make test   install with test extras, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PREFECT_PORT ?= 4200
MLFLOW_PORT  ?= 5000
SERVICES_ENV := PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api MLFLOW_TRACKING_URI=http://127.0.0.1:$(MLFLOW_PORT)

.PHONY: install demo test services stop clean

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

test: install
	$(BIN)/python -m pytest

stop:
	$(BIN)/python -m infra.services stop

clean: stop
	rm -rf runs .ssl
