# make demo: set up, build the demo bundle if missing, triage the sample chest files.
# make test: set up, lint, run the test suite.
VENV := .venv
BUNDLE := var/bundles/demo

.PHONY: setup demo test bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

demo: setup
	test -f $(BUNDLE)/manifest.json || $(VENV)/bin/scxnn-train demo-bundle --out $(BUNDLE)
	$(VENV)/bin/scxnn-node bundle verify $(BUNDLE)
	$(VENV)/bin/scxnn-node infer tests/data/*.dcm --config config.yaml

test: setup
	$(VENV)/bin/ruff check scxnn_node training tests bench
	$(VENV)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/python bench/inference.py
