# make demo: set up, then run the whole node on loopback with the demo bundle (built if missing).
# make test: set up, lint, start a throwaway PostgreSQL, run the test suite.
VENV := .venv

.PHONY: setup demo test bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/scxnn-node demo --config config.yaml

test: setup
	$(VENV)/bin/ruff check scxnn_node training tests bench
	SCXNN_TEST_POSTGRES_URL=$$(bash scripts/postgres.sh) $(VENV)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/python bench/inference.py
