# Developer entry points. The README's two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NVCC ?= nvcc
CUDA_GENCODE := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
CUDA_OBJ_DIR := build/cuda-check

.PHONY: setup demo test cuda-check bench clean

# Fresh virtual environment with the CPU build of torch (kept on this disk) and deltainf built in place
# against it: the runtime dependencies only, which is all `make demo` needs.
$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/include/deltainf/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77" wheel
	$(PY) -m pip install -q torch==2.13.0 pybind11 ninja
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q --no-build-isolation -e .
	touch $@

# What the tests and benchmarks add: the test, bench and peer extras (kronfluence without its torchvision).
$(VENV)/.installed-test: $(VENV)/.installed
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q --no-build-isolation -e ".[test,bench,peers]"
	$(PY) -m pip install -q --no-deps kronfluence==1.0.1
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/deltainf demo --out out/demo

test: $(VENV)/.installed-test
	$(VENV)/bin/pytest -q

bench: $(VENV)/.installed-test
	$(VENV)/bin/deltainf bench

# Compile the torch-free CUDA kernels with nvcc alone, for sm_80 and sm_90 (no GPU, no torch needed).
cuda-check:
	@mkdir -p $(CUDA_OBJ_DIR)
	@pids=""; for f in csrc/cuda/*.cu; do \
	  $(NVCC) -std=c++17 -O3 -Icsrc/include $(CUDA_GENCODE) -c $$f -o $(CUDA_OBJ_DIR)/$$(basename $$f .cu).o & \
	  pids="$$pids $$!"; \
	done; for p in $$pids; do wait $$p || exit 1; done
	@echo "cuda-check: compiled $$(ls csrc/cuda/*.cu | wc -l) CUDA sources for sm_80 and sm_90"

clean:
	rm -rf build $(VENV) deltainf/_C*.so deltainf/_build_info.json *.egg-info
