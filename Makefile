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

.PHONY: test bench lint cuda-check triton-check clean test-cu test-integrations

# Re-install (and so rebuild the extension) when the build files or any C++/CUDA source change.
BUILD_INPUTS := setup.py pyproject.toml fused_losses/_build.py \
                $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cpu/*.inc \
                           csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h)
$(STAMP): $(BUILD_INPUTS)
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

# The newest torch these machines install, a CUDA build (torch 2.14.1+cu130 with torchvision
# 0.29.1, ~5.5 GB, from local disk), C++20 headers: both extensions compiled against it
# (FUSED_LOSSES_CUDA=1: fail rather than skip _cuda), no GPU needed.  Editable like $(VENV):
# both venvs write fused_losses/_C*.so in place; the one whose torch does not match that
# module's build record compiles its own into ~/.cache/fused_losses on first use (once).
# The drop-in tests whose libraries import torchvision (OpenCLIP, lightly) run here too; the
# pml / GeomLoss / sentence-transformers drop-in tests run in `make test` (torch 2.13).
VENV_CU ?= .venv-cu
CU_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY_CU := $(VENV_CU)/bin/python
CU_STAMP := $(VENV_CU)/.installed

$(CU_STAMP): $(BUILD_INPUTS)
	test -x $(PY_CU) || $(PYTHON) -m venv $(VENV_CU)
	$(PY_CU) -m pip install -q --upgrade pip
	$(PY_CU) -m pip install -q $(CU_TORCH_SPEC) numpy setuptools wheel ninja
	FUSED_LOSSES_CUDA=1 $(PY_CU) -m pip install -q --no-build-isolation -e ".[test,open_clip,lightly]"
	touch $@

# On the CUDA torch, what depends on the torch version: what is built and loaded (python -m
# fused_losses), the build and loader (C++20 flags, records, torch.ops.fused_losses_cuda.*
# registered), the compiled CPU kernels of every ISA build against the float64 reference
# (forward and gradients), the cuda backend's registration and fakes, torch.compile through the
# fakes, and the OpenCLIP/lightly drop-ins.  The full suite runs on $(TORCH_SPEC) (`make test`);
# its backend-parametrized loss tests cost ~15 min more here and test version-independent math.
TEST_CU ?= tests/test_install.py tests/test_build.py tests/test_cuda_backend.py tests/test_modules.py
TEST_CU_K ?= not glue and not (test_modules and not compile)
INTEGRATION_TESTS ?= tests/test_integrations_open_clip.py tests/test_integrations_lightly.py
test-cu: $(CU_STAMP)
	$(PY_CU) -m fused_losses
	$(PY_CU) -m pytest -q -ra -p no:cacheprovider $(TEST_CU) -k "$(TEST_CU_K)"
	$(PY_CU) -m pytest -q -ra -p no:cacheprovider $(INTEGRATION_TESTS)

test-integrations: $(CU_STAMP)
	$(PY_CU) -m pytest -q -ra -p no:cacheprovider $(INTEGRATION_TESTS)

# Every Triton kernel specialization the launchers can produce, compiled ahead of time for sm_80
# and sm_90a (no GPU needed); fails on a register spill, a compile error or too much shared memory.
triton-check: $(STAMP)
	$(PY) scripts/triton_check.py

clean:
	rm -rf $(VENV) $(VENV_CU) build dist *.egg-info fused_losses/*.so fused_losses/*.build.json
