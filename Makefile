# One-command set-up + run. `make demo` and `make test` each create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CUDA build of torch lets every install compile the CUDA kernels (msff._C) even on a
# machine without a GPU; set TORCH_SPEC=torch==2.13.0 for the small CPU-only build.
TORCH_SPEC  ?= torch==2.14.1
TRITON_SPEC ?= triton==3.8.0
# The optional comparison-network libraries (msff[zoo]), pinned to match torch 2.14.1 so pip never
# swaps torch; empty for any other torch (PyPI's torchvision does not import beside torch 2.13.0).
ifeq ($(TORCH_SPEC),torch==2.14.1)
ZOO_SPEC ?= torchvision==0.29.1 segmentation-models-pytorch==0.6.0
else
ZOO_SPEC ?=
endif
PYTEST_ARGS ?=

.PHONY: install demo test test-gpu test-slow bench lint env clean kernel-report gpu-check gpu-check-device

$(BIN)/.msff-installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)" $(ZOO_SPEC) numpy pybind11 ninja setuptools wheel
	$(BIN)/pip install --no-build-isolation -e ".[test,vector,onnx]"
	touch $@

install: $(BIN)/.msff-installed

demo: install
	$(BIN)/msff demo --out demo_out --overwrite

test: install
	$(BIN)/python -m pytest tests msff --durations=15 $(PYTEST_ARGS)

test-gpu: install
	$(BIN)/python -m pytest tests -m gpu $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest tests -m slow $(PYTEST_ARGS)

# GPU benchmarks (skip cleanly on CPU); the compact JSON summary (medians, ratios per group) goes to
# BENCH_RESULTS, pytest-benchmark's own JSON beside it.
BENCH_RESULTS ?= benchmarks/results/bench.json
bench: install
	MSFF_BENCH_RESULTS=$(BENCH_RESULTS) $(BIN)/python -m pytest benchmarks --benchmark-only -m "not slow" \
		--benchmark-json=$(basename $(BENCH_RESULTS))-pytest-benchmark.json $(PYTEST_ARGS)

# Offline (CPU-only) view of every kernel: registers, spills, SASS mix, roofline, for sm_90a and
# sm_80 -> benchmarks/results/kernel-report.json. KR_ARGS e.g. "--dtypes bfloat16 --arch sm_90a".
KR_ARGS ?=
kernel-report: install
	env -u TRITON_INTERPRET $(BIN)/python -m msff.kernel_report $(KR_ARGS)

# One command on an H100/H200: parity, sanitizer, benchmarks, then the validation record that
# lets `auto` pick a fused backend (msff/validation/*.json). GPU_CHECK_ARGS e.g. "--no-autotune".
GPU_CHECK_ARGS ?=
gpu-check: install
	env -u TRITON_INTERPRET $(BIN)/python -m msff.gpu_check $(GPU_CHECK_ARGS)

# The same check on the workplace's lent GPU machine, whose python3 already holds torch and triton
# and which can install nothing: builds msff._C in place for that GPU, runs the check within
# GPU_BUDGET seconds (default 360), copies log, results and validation record to $OUT.
gpu-check-device:
	bash benchmarks/gpu_check_device.sh $(GPU_CHECK_ARGS)

lint: install
	$(BIN)/ruff check msff kernels tests benchmarks setup.py

env: install
	$(BIN)/python -m msff.env

clean:
	rm -rf $(VENV) build *.egg-info msff/_C*.so demo_out .pytest_cache .benchmarks
