# Two commands do all the set-up on a fresh machine:
#   make pretrain   a short pretraining of the tiny config on the embedded data (CPU); run again, it
#                   goes on from runs/tiny's last checkpoint (or says the run is complete):
#                   make pretrain ARGS="--steps 600" trains it further
#   make test       the test suite (what .ci/run runs, after make lint)
# Both create .venv and install into it on first use, one step at a time, each announced:
#   torch (CPU) -> the package and the CUDA core (what pretraining needs) -> for make test only, the
#   emulated CUDA core and its AddressSanitizer build. A stamp file per step in .venv.
#   make lint       ruff (lint, and format --check), mypy on geomoe_kernels, clang-format on csrc/
#   make clean      removes runs/ and build outputs; make distclean also the venv

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel that lies on the dev and CI machines' disk; installed only where the venv has no
# torch yet. Elsewhere pass TORCH_SPEC='torch>=2.4' (or your CUDA build); nothing else pins torch.
TORCH_SPEC ?= torch==2.13.0
# the CUDA core's architectures (setup.py reads GEOMOE_CUDA_ARCHS)
GEOMOE_CUDA_ARCHS ?= 80;90a
export GEOMOE_CUDA_ARCHS
TORCH_STAMP := $(VENV)/.geomoe-torch
STAMP := $(VENV)/.geomoe-installed
TEST_STAMP := $(VENV)/.geomoe-test-builds
ARGS ?=

# ruff format covers the whole tree. clang-format covers the headers written for it so far; the
# kernel sources (csrc/*.cu, bindings.cpp) are not reformatted yet: the emulated build rewrites
# their launch lines as text, so that change wants its own commit and an emulation run.
CLANG_FORMATTED := csrc/geomoe_core.h csrc/emulation/*.h tests/emulation/broken_kernels.cu

.PHONY: setup pretrain test lint info clean distclean

$(TORCH_STAMP):
	@test -x $(BIN)/python || { echo "==> creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@$(BIN)/python -c "import torch" 2>/dev/null || { echo "==> installing $(TORCH_SPEC) (CPU)"; $(BIN)/pip install -q "$(TORCH_SPEC)"; }
	@touch $@

$(STAMP): $(TORCH_STAMP) pyproject.toml setup.py
	@echo "==> installing geomoe_kernels, geomoe and their dependencies (pip)"
	@GEOMOE_EXTENSIONS=none $(BIN)/pip install -q -e ".[test,hf,geo]"
	@echo "==> building the CUDA core for sm_$(subst ;,$(comma) sm_,$(GEOMOE_CUDA_ARCHS)) where nvcc is found (no GPU needed; minutes on 2 cores)"
	@GEOMOE_EXTENSIONS=core $(BIN)/pip install -q --no-deps -e .
	@touch $@

# the tests also run the kernels on the CPU through the emulated core and its ASan build
$(TEST_STAMP): $(STAMP)
	@echo "==> building the emulated CUDA core and its AddressSanitizer build (make test runs the kernels on the CPU through them; minutes on 2 cores)"
	@GEOMOE_EXTENSIONS=emulated,asan $(BIN)/pip install -q --no-deps -e .
	@touch $@

comma := ,

setup: $(STAMP)

pretrain: $(STAMP)
	$(BIN)/geomoe pretrain --config tiny --out runs/tiny --resume auto $(ARGS)

# the tests (two workers, pytest-xdist: CI has two cores; the 15 slowest listed, to keep the suite
# inside CI's budget), then the benchmark items
# run once each on tiny shapes (smoke): two summaries, so the test count is of tests; both run, and
# either failing fails the target
test: $(TEST_STAMP)
	status=0; echo "== tests"; $(BIN)/python -m pytest -q -n 2 --durations=15 tests || status=$$?; \
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
	rm -rf runs build *.egg-info

distclean: clean
	rm -rf $(VENV)
