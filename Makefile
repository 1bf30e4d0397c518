VENV ?= .venv
PY := $(VENV)/bin/python
export MUJOCO_GL ?= egl

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
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench.py --out bench.json

clean:
	rm -rf $(VENV) runs bench.json .pytest_cache
