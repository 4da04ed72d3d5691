# Two commands do all the set-up on a fresh machine:
#   make pretrain   a short pretraining of the tiny config on the embedded data (CPU, ~1.5 min)
#   make test       the test suite (what .ci/run runs, after make lint)
# Both create .venv and install into it on first use.
#   make lint       ruff (lint, and format --check), mypy on geomoe_kernels, clang-format on csrc/

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel that lies on the dev and CI machines' disk; installed only where the venv has no
# torch yet. Elsewhere pass TORCH_SPEC='torch>=2.4' (or your CUDA build); nothing else pins torch.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.geomoe-installed

# ruff format covers the whole tree. clang-format covers the headers written for it so far; the
# kernel sources (csrc/*.cu, bindings.cpp) are not reformatted yet: the emulated build rewrites
# their launch lines as text, so that change wants its own commit and an emulation run.
CLANG_FORMATTED := csrc/geomoe_core.h csrc/emulation/*.h tests/emulation/broken_kernels.cu

.PHONY: setup pretrain test lint info clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	GEOMOE_EMULATION_ASAN=1 $(BIN)/pip install -q -e ".[test,hf,geo]"
	touch $@

setup: $(STAMP)

pretrain: $(STAMP)
	$(BIN)/geomoe pretrain --config tiny --out runs/tiny

# the tests, then the benchmark items run once each on tiny shapes (smoke): two summaries, so the
# test count is of tests; both run, and either failing fails the target
test: $(STAMP)
	status=0; echo "== tests"; $(BIN)/python -m pytest -q tests || status=$$?; \
	echo "== benchmark items, each run once on tiny shapes (not tests)"; \
	$(BIN)/python -m pytest -q benchmarks --benchmark-disable || status=$$?; \
	exit $$status

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/clang-format --dry-run --Werror $(CLANG_FORMATTED)

info: $(STAMP)
	$(BIN)/python -m geomoe_kernels.info

clean:
	rm -rf $(VENV) runs build *.egg-info
