# The two quick-start commands: `make demo` (the main job on the embedded demo cohort) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test venv slurm-up slurm-down clean

venv:
	@bash scripts/bootstrap.sh

demo: venv
	$(PY) -m launch.demo --run-dir $(RUN_DIR)

test: venv
	bash scripts/run_tests.sh $(PYTEST_ARGS)

slurm-up:
	bash scripts/slurm_up.sh

slurm-down:
	bash scripts/slurm_down.sh

clean:
	rm -rf runs .pytest_cache
