# Every target makes and uses its own virtual environment in .venv (test-core: .venv-core).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.docs-installed
CORE_VENV  := .venv-core
CORE_PY    := $(CORE_VENV)/bin/python
CORE_STAMP := $(CORE_VENV)/.installed

.PHONY: install demo test test-slow test-core docs bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first, pinned: the CPU build is available offline; a newer torch would pull CUDA wheels.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -e '.[docs]'
	touch $(DOCS_STAMP)

# The library core alone: torch, numpy, scipy, numba, pyyaml, and dataorder without its extras.
$(CORE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(CORE_VENV)
	$(CORE_PY) -m pip install --upgrade pip
	$(CORE_PY) -m pip install torch==2.13.0
	$(CORE_PY) -m pip install numpy scipy numba pyyaml
	$(CORE_PY) -m pip install --no-deps -e .
	touch $(CORE_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dataorder compare --data digits --model logreg --orders rr,so,grab --epochs 10 --seeds 3

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q -p no:cacheprovider tests dataorder --doctest-modules

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q -p no:cacheprovider

# The core imports without the [cli] extra, and the command says which extra to install.
test-core: $(CORE_STAMP)
	$(CORE_PY) -c "import dataorder, dataorder.samplers, dataorder.schedules, dataorder.scores, dataorder.grads, dataorder.ghost; print('core imports: ok')"
	@message=$$($(CORE_PY) -m dataorder score --help 2>&1); status=$$?; echo "$$message"; \
	  test $$status -eq 2 && test "$$(printf '%s\n' "$$message" | wc -l)" -eq 1 && \
	  printf '%s' "$$message" | grep -qF "pip install 'dataorder[cli]'" && echo "cli without the extra: ok"

docs: $(DOCS_STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir build/site

bench: $(STAMP)
	$(VENV)/bin/dataorder bench

clean:
	rm -rf $(VENV) $(CORE_VENV) build *.egg-info
