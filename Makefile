# Two commands: `make demo` (install + run the notebooks on the tiny preset) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pkdkit-installed
OUT ?= reports/demo

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml constraints.txt scripts/ensure_fiftyone_db.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e ".[fiftyone,test]"
	$(BIN)/python scripts/ensure_fiftyone_db.py
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pkdkit notebooks run --preset tiny --out $(OUT)
	@echo "Results: $(OUT) (executed notebooks, figures/*.png, metrics.json)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf runs reports/demo .pytest_cache
