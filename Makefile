# embedx: `make demo` runs the whole loop offline, `make test` runs the tests (CI: .ci/run).
# Both install into .venv/ first when it is missing or older than its inputs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.embedx-installed
DATA ?=
PYTEST_ARGS ?=

.PHONY: install test test-fast test-zoo demo bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e '.[test,ray]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# all 81 backbones' random-init export with parity, the `zoo` ones included (long: docs/backbones.md)
test-zoo: $(STAMP)
	$(BIN)/python -m pytest --zoo tests/test_export.py::test_every_backbone_exports_with_parity $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m embedx demo $(if $(DATA),--data $(DATA),)

bench: $(STAMP)
	$(BIN)/python bench/run.py

lint: $(STAMP)
	$(BIN)/ruff check embedx tests bench  # line length and rules: [tool.ruff] in pyproject.toml

clean:
	rm -rf cache/onnx cache/*.h5 cache/demo .pytest_cache
