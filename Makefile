# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve test install proto models clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,export]'
	touch $(STAMP)

install: $(STAMP)

## serve the bundled model repository on 127.0.0.1:8001 (metrics on :8002)
serve: $(STAMP)
	$(VENV)/bin/kiln serve --model-repository model_repo

## run the whole test suite
test: $(STAMP)
	$(PY) -m pytest -q

## regenerate server/protocol from proto/
proto: $(STAMP)
	$(PY) proto/generate.py

## regenerate the bundled models (and mlp_wide, which is not committed)
models: $(STAMP)
	$(PY) -m export.make_bundled --mlp-wide

clean:
	rm -rf $(VENV) build *.egg-info
