# Two commands a newcomer needs: `make demo` (the main job, synthetic data, offline) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv test test-slow demo bench clean

venv: $(VENV)/.installed

# torch is installed first and pinned by constraints.txt so nnunetv2's dependencies keep the CPU wheel.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

test: venv
	$(BIN)/python -m pytest -q

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

demo: venv
	$(BIN)/rl-adapt demo --out results/runs/demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
