# The two commands of the README quickstart. Both create .venv/ (idempotent) before they run.
#   make demo   SmolLM2-135M converted, TP=3 over local gloo processes: uncompressed vs searched config vs INT4
#   make test   lint (make lint: ruff check + format check) and the test suite
PY := .venv/bin/python
MCORE ?= 0.16.1

.PHONY: demo test lint venv test-mcore-max check-wheel cuda-check clean

venv:
	@bash scripts/setup_venv.sh .venv $(MCORE)

demo: venv
	$(PY) -m megatron_tpcomp.cli demo $(ARGS)

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The other end of the supported megatron-core range, in its own environment (the slow Slurm test runs once,
# in `make test`).
test-mcore-max:
	@bash scripts/setup_venv.sh .venv-mcore-0.19.2 0.19.2
	.venv-mcore-0.19.2/bin/python -m pytest -q -m "megatron and not slow" $(PYTEST_ARGS)

# The wheel, installed in a fresh environment outside the checkout, works (kernel sources, CLI, collectives).
check-wheel: venv
	bash scripts/check_wheel.sh $(PY)

cuda-check:
	bash scripts/check_cuda.sh

clean:
	rm -rf .venv .venv-mcore-* build dist *.egg-info megatron_tpcomp/_csrc
