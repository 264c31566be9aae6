# One command each: `make demo` (install + tiny GRPO run) and `make test` (install + the suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install lint system-deps test chaos demo clean gpu-wheels

install: $(STAMP)

# pyproject.toml gives torch a range (the sglang extra pins its own); the CPU install names the version whose
# small CPU build pip takes where one lies on disk, rather than PyPI's newest CUDA build.
CPU_TORCH := torch==2.13.0
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]' '$(CPU_TORCH)'
	touch $@

# The Slurm tests run a real local cluster (`rlhpc cluster up --accounting`): as root, install Debian's
# packages for it (and bubblewrap, which tests/test_container.py runs a container with on it).
system-deps: install
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    ! { command -v slurmdbd && command -v bwrap; } >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    $$($(PY) -c 'from hpc import local_accounting as a, local_cluster as c; \
	                 print(c.PACKAGES, a.PACKAGES, c.TEST_PACKAGES)') \
	    >/dev/null; \
	fi

# SGLang's own argument parser and request classes judge what the SGLang engine sends
# (tests/sglang_contract.py): the release the sglang extra is checked against, without its dependencies
# (they pull CUDA torch, ~11 GB), plus the few packages that its parser and request modules import.
SGLANG_CONTRACT := .sglang-contract
SGLANG_CONTRACT_VERSION := 0.5.23
$(SGLANG_CONTRACT)/.installed-$(SGLANG_CONTRACT_VERSION): | install
	rm -rf $(SGLANG_CONTRACT)
	$(PY) -m pip install --quiet --no-deps --no-compile --target $(SGLANG_CONTRACT) \
	  sglang==$(SGLANG_CONTRACT_VERSION) msgspec orjson pybase64 psutil starlette pyzmq IPython traitlets
	touch $@

# The linter's rules and the type checker's settings are in pyproject.toml ([tool.ruff], [tool.mypy]);
# `make test` runs both first.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: install lint system-deps $(SGLANG_CONTRACT)/.installed-$(SGLANG_CONTRACT_VERSION)
	$(PY) -m pytest

# The whole interruption matrix on the local cluster (`make test` runs each cause and each moment once),
# and the real time limit, which waits on Slurm's own clock.
chaos: install system-deps
	RLHPC_CHAOS=full $(PY) -m pytest tests/test_chaos.py

artifacts/tiny-qwen3/config.json: | install
	$(PY) -m rl.tiny_model artifacts/tiny-qwen3

demo: install artifacts/tiny-qwen3/config.json
	$(VENV)/bin/rlhpc run configs/tiny_cpu.toml

# What benchmarks/gpu_smoke.py carries to a GPU machine without a registry (Python 3.12, its own CUDA torch and
# transformers): rlhpc's other dependencies as wheels, megatron-core in the range of the `megatron` extra.
GPU_WHEELS := .gpu-wheels
GPU_WHEEL_TAGS := --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
gpu-wheels: install
	$(PY) -m pip download --quiet --dest $(GPU_WHEELS) $(GPU_WHEEL_TAGS) pydantic math-verify tomli-w submitit xxhash \
	  pytest-timeout
	$(PY) -m pip download --quiet --dest $(GPU_WHEELS) $(GPU_WHEEL_TAGS) --no-deps $$($(PY) -c 'import tomllib; \
	  print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["megatron"]))')
	du -sh $(GPU_WHEELS)

clean:
	rm -rf $(VENV) $(SGLANG_CONTRACT) $(GPU_WHEELS) .gpu-site artifacts runs .pytest_cache
