# make demo: set up, build the demo bundle if it is missing, run the whole node on loopback with it.
# make test: set up, lint, start a throwaway PostgreSQL, run the test suite.
VENV := .venv
# config.yaml's model.bundle: where `scxnn-node demo` looks for the bundle it runs.
DEMO_BUNDLE := var/bundles/demo

.PHONY: setup demo test bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

demo: setup $(DEMO_BUNDLE)/manifest.json
	$(VENV)/bin/scxnn-node demo --config config.yaml

# About 4 minutes on a 2-core CPU; built once, then reused.
$(DEMO_BUNDLE)/manifest.json: | $(VENV)/.installed
	$(VENV)/bin/scxnn-train demo-bundle --out $(DEMO_BUNDLE)

test: setup
	$(VENV)/bin/ruff check scxnn_node training tests bench
	SCXNN_TEST_POSTGRES_URL=$$(bash scripts/postgres.sh) $(VENV)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/python bench/inference.py
