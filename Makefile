# fused-losses: the two commands of the README.
#   make test    — create .venv if missing, install torch + triton + the package (with its C++
#                  extension) and test extras, then lint and run the test suite.
#   make bench   — same environment, then the default benchmark (python -m fused_losses.bench).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: test bench lint cuda-check triton-check clean test-integrations

# Re-install (and so rebuild the extension) when the build files or any C++/CUDA source change.
$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cpu/*.inc \
                                            csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: the extension builds against it (--no-build-isolation below).
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q "triton>=3.0" numpy setuptools wheel ninja
	$(PIP) install -q --no-build-isolation -e ".[test,bench,triton]"
	# OpenCLIP for the bench's peer, without its dependencies (torchvision would replace torch):
	# the bench loads its loss.py alone when the package does not import (torch 2.13 here).
	$(PIP) install -q --no-deps "open_clip_torch>=2.20"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check $(wildcard fused_losses tests bench scripts examples)

# Plain serial pytest.  Measured on the 2-core CI machine (clean clone, Nov 2026): serial 311 s,
# `-n 2` (pytest-xdist) 331 s: torch's kernels already use both cores and the interpreted-Triton
# tests are CPU-bound, so two workers only contend.  Exit code 5 (no tests collected) fails.
test: $(STAMP) lint
	$(PY) -m pytest -q -ra

bench: $(STAMP)
	$(PY) -m fused_losses.bench

cuda-check:
	bash scripts/check_cuda_compile.sh

# The drop-in tests whose libraries import torchvision (OpenCLIP, lightly), in a second venv:
# torch 2.14.1 + torchvision 0.29.1 (a CUDA build, from local disk, ~5.5 GB; runs on the CPU).
# The pml / GeomLoss / sentence-transformers drop-in tests run in `make test` (torch 2.13).
# No extension is built there (setup.py's C++17 flag cannot compile torch 2.14's headers);
# the in-tree one `make test` built loads with 2.14.1 here, else "auto" runs the reference.
VENV_CU ?= .venv-cu
CU_STAMP := $(VENV_CU)/.installed
INTEGRATION_TESTS ?= tests/test_integrations_open_clip.py tests/test_integrations_lightly.py

$(CU_STAMP): setup.py pyproject.toml
	test -x $(VENV_CU)/bin/python || $(PYTHON) -m venv $(VENV_CU)
	$(VENV_CU)/bin/python -m pip install -q --upgrade pip
	$(VENV_CU)/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" numpy setuptools wheel
	FUSED_LOSSES_CPU_EXT=0 FUSED_LOSSES_CUDA=0 $(VENV_CU)/bin/python -m pip install -q \
		--no-build-isolation -e ".[open_clip,lightly]" "pytest>=8"
	touch $(CU_STAMP)

test-integrations: $(CU_STAMP)
	$(VENV_CU)/bin/python -m pytest -q -ra -p no:cacheprovider $(INTEGRATION_TESTS)

# Every Triton kernel specialization the launchers can produce, compiled ahead of time for sm_80
# and sm_90a (no GPU needed); fails on a register spill, a compile error or too much shared memory.
triton-check: $(STAMP)
	$(PY) scripts/triton_check.py

clean:
	rm -rf $(VENV) build *.egg-info fused_losses/*.so
