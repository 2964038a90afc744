# The two commands of the README: `make demo` and `make test`. Both install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

# torch first, by itself: `pip install torch==2.13.0` takes the CPU build these machines
# carry; everything else is pinned by constraints.txt (a `pip freeze` of a good install).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/pyrosweep demo

test: install
	$(PY) -m pytest

# the peers only the benchmarks compare with (jax, dynamax: the bench extra) join the venv here
bench: install
	$(PY) -m pip install -q -c constraints.txt -e ".[test,bench]"
	@for script in bench/bench_*.py; do $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
