# Two commands do all the set-up on a fresh machine:
#   make pretrain   a short pretraining of the tiny config on the embedded data (CPU, ~1.5 min)
#   make test       the test suite (what .ci/run runs)
# Both create .venv and install into it on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel that lies on the dev and CI machines' disk; installed only where the venv has no
# torch yet. Elsewhere pass TORCH_SPEC='torch>=2.4' (or your CUDA build); nothing else pins torch.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.geomoe-installed

.PHONY: setup pretrain test info clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	GEOMOE_EMULATION_ASAN=1 $(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(STAMP)

pretrain: $(STAMP)
	$(BIN)/geomoe pretrain --config tiny --out runs/tiny

test: $(STAMP)
	$(BIN)/python -m pytest -q tests benchmarks --benchmark-disable

info: $(STAMP)
	$(BIN)/python -m geomoe_kernels.info

clean:
	rm -rf $(VENV) runs build *.egg-info
