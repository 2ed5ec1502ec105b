# Two commands: `make demo` (install + run the notebooks on the tiny preset into runs/demo) and `make test`.
# `make example` rewrites the committed example report reports/example-tiny/: exactly what `make demo` runs, from a fresh run directory.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pkdkit-installed
OUT ?= runs/demo
EXAMPLE := reports/example-tiny

.PHONY: demo example test install browser bench clean

$(STAMP): Makefile pyproject.toml constraints.txt scripts/ensure_fiftyone_db.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e ".[fiftyone,onnx,test]"
	$(BIN)/python scripts/ensure_fiftyone_db.py
	-@$(MAKE) --no-print-directory browser
	touch $(STAMP)

install: $(STAMP)

# Best effort: Debian's chromium for the browser tests (tests/test_browser.py skips them without it).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -q && apt-get install -y -q chromium; } || \
		echo "chromium not installed (needs root and apt-get): the browser tests will be skipped"

demo: $(STAMP)
	$(BIN)/pkdkit notebooks run --preset tiny --out $(OUT)
	@echo "Results: $(OUT) (executed notebooks, figures/*.png, metrics.json; git ignores runs/)"

example: $(STAMP)
	rm -rf runs/example-tiny $(EXAMPLE)
	@# the run's FiftyOne dataset too (it lives in FiftyOne's database), so that notebook 5 builds it afresh
	FIFTYONE_DATABASE_VALIDATION=false $(BIN)/python -c "import fiftyone as fo; from pkdkit.fiftyone_app import dataset_name; \
		n = dataset_name('runs/example-tiny'); fo.dataset_exists(n) and fo.delete_dataset(n)"
	$(BIN)/pkdkit notebooks run --preset tiny --run-dir runs/example-tiny --out $(EXAMPLE)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf runs .pytest_cache
