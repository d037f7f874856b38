# Two commands a newcomer needs: `make demo` and `make test`. Both build .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The torch to install when the venv has none. On a CUDA machine, e.g.:
#   make install TORCH_SPEC=torch TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: demo test lint install clean-venv

$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build on this machine; a range would pull a multi-GB CUDA build.
	# A torch already in the venv (e.g. a CUDA build installed first, see README) is kept as is.
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "keeping the torch already in $(VENV): $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "$(BIN)/python -m pip install -q $(TORCH_SPEC) $(TORCH_PIP_ARGS)"; \
		$(BIN)/python -m pip install -q $(TORCH_SPEC) $(TORCH_PIP_ARGS); \
	fi
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/bigasp demo $(DEMO_ARGS)

# The tests run one torch thread each, so they run in TEST_WORKERS processes (pytest-xdist),
# a file's tests in one process (module fixtures built once). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/ruff check src tests scripts
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

clean-venv:
	rm -rf $(VENV)
