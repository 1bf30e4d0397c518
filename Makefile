VENV ?= .venv
PY := $(VENV)/bin/python
export MUJOCO_GL ?= egl
# pytest-xdist workers for `make test` (whole test files per worker, --dist loadfile, so module-scoped
# fixtures such as the one-node Slurm are set up once). Default 0, one process: on the 2-core CI
# machine the suite is CPU-bound and 2 workers took as long (1427 s vs 1388 s); more cores gain.
TEST_WORKERS ?= 0

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py sparserl/csrc/sparse_matmul.cc
	bash scripts/system_deps.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

demo: install
	$(VENV)/bin/sparserl demo

test: install
	$(PY) -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

bench: install
	$(PY) benchmarks/bench.py --out bench.json

clean:
	rm -rf $(VENV) runs bench.json .pytest_cache
