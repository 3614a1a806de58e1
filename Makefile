# Every target makes and uses its own virtual environment in .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first, pinned: the CPU build is available offline; a newer torch would pull CUDA wheels.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dataorder compare --data digits --model logreg --orders rr,so,grab --epochs 10 --seeds 3

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q -p no:cacheprovider tests dataorder --doctest-modules

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q -p no:cacheprovider

bench: $(STAMP)
	$(VENV)/bin/dataorder bench

clean:
	rm -rf $(VENV) build *.egg-info
