# attnmem: the two commands are `make test` (set-up + lint + tests) and `make demo`.
# Everything installs into $(VENV); a fresh machine needs only Python 3.11 and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.inc')

.PHONY: test lint pytest build venv bench clean cuda-check cuda-emu demo

venv: $(VENV)/.deps

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install numpy ninja pybind11 setuptools wheel
	touch $@

# Builds the extension in place (editable install); rebuilt when a C++/CUDA source changes.
build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.deps setup.py $(CSRC)
	$(PIP) install --no-build-isolation -e ".[test]"
	touch $@

lint: build
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

pytest: build
	$(PY) -m pytest -q

test: lint pytest

# Scans the bundled testbed prompts (16 memorized, 16 held-out) with the default model, attnmem's
# bundled testbed (attnmem/data/testbed: a 32x32 model trained on synthetic captions, 100 of them
# memorized), with metric E at the layer of the model's calibration file (first step, early
# exit), and writes the report; then scans them with Wen et al.'s first-step detector and draws
# both ROC curves side by side ($(DEMO_OUT)/compare/compare.png).
DEMO_OUT ?= report/demo
demo: build
	rm -rf $(DEMO_OUT)
	$(PY) -m attnmem scan attnmem/data/testbed_prompts.txt --metric E --out $(DEMO_OUT)/results.jsonl
	$(PY) -m attnmem report $(DEMO_OUT)/results.jsonl --labels attnmem/data/testbed_labels.txt -o $(DEMO_OUT)
	$(PY) -m attnmem scan attnmem/data/testbed_prompts.txt --metric wen --out $(DEMO_OUT)/wen/results.jsonl
	$(PY) -m attnmem report $(DEMO_OUT)/results.jsonl $(DEMO_OUT)/wen/results.jsonl \
		--labels attnmem/data/testbed_labels.txt -o $(DEMO_OUT)/compare

# Benchmarks (not part of `make test`): op table, then the SD1.x UNet table; both written to
# bench/results/ with the machine, torch version and commit.
bench: build
	$(PY) -m bench.run_op_bench
	$(PY) -m bench.run_unet_bench
	$(PY) -m bench.detector_bench

# Compiles the CUDA kernel against torch+CUDA (no GPU needed) and imports it.
cuda-check:
	bash bench/cuda_compile_check.sh

# Runs the CUDA kernel's device code on the CPU under the host emulator (tests/cuda_emu): every
# launch plan, the op's semantics against attnmem/reference.py, device asserts, mutation check.
# Needs g++ (C++20) and the CUDA headers ($$CUDA_HOME/include, default /usr/local/cuda).
cuda-emu: build
	$(PY) -m pytest -q -m cuda_emu tests/cuda_emu

clean:
	rm -rf build *.egg-info attnmem/*.so $(VENV)/.built
