# Two commands a newcomer needs: `make demo` (the main job, synthetic data, offline) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv test test-slow demo bench lock clean

venv: $(VENV)/.installed

# constraints.txt pins every package to the version the suite passed with (pyproject.toml keeps ranges for
# library users). torch goes first: its pin keeps the CPU wheel (nnunetv2's dependencies would pull a CUDA build).
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

# Refresh the pins from a working environment (after `make test` passed with it): one line.
lock: venv
	{ sed -n '/^#/p' constraints.txt; $(BIN)/pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
