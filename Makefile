# timesformer-harness: every target creates/reuses .venv by itself.
#   make test                      the CPU test suite (what CI runs), on the versions pinned in constraints.txt
#   make test-latest               the same suite on the newest releases, in a fresh .venv-latest
#   make constraints               test-latest, then pin what it ran on into constraints.txt (refresh on purpose)
#   make bench ATTN=all            throughput/memory/FLOPs per attention variant
#   make bench-compare A=RUN B=RUN two bench runs side by side (ratios, plot)
#   make gpu-perf                  the train step's speed on one GPU (eager batches, compiled, SDPA backends, Trainer)
#   make gpu-input                 the input shoot-out on one GPU (NVDEC/nvJPEG, 256 px, batch 32, e2e data wait; ~8 min)
#   make docs                      regenerate docs/config.md from the config dataclasses
#   make wheelhouse WHEELS=DIR     every dependency as a wheel in DIR; make venv WHEELS=DIR installs from it offline
#   make clean                     remove test and benchmark caches (keeps runs/); make clean-runs deletes runs/
# torch: an importable torch (e.g. an NGC CUDA build, also one inside another venv) is reused via
# --system-site-packages; otherwise TORCH_SPEC is installed. Override: make test TORCH_SPEC='torch==2.5.1'.
# triton likewise (PyTorch's CUDA wheels bring their own; a CPU torch gets TRITON_SPEC, for the tests' interpreter).

PYTHON     ?= python3
VENV       ?= .venv
VPY        := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.8.0
STAMP      := $(VENV)/.installed
# the versions the suite was last green with (torch aside: TORCH_SPEC, or the importable torch reused);
# empty = the newest releases
CONSTRAINTS ?= constraints.txt
LATEST_VENV ?= .venv-latest

ATTN    ?= all
PRESET  ?=
MODE    ?= both
FRAMES  ?=
IMG     ?=
STEPS   ?=
CONFIG  ?= configs/exp/toy_divided_cpu.yaml
BASELINE ?= benchmarks/baselines/cpu_bench.json
BENCH_PRESET ?= $(PRESET)
PYTEST_ARGS ?=
# pytest-xdist workers for make test / test-fast (one test file per worker at a time); 0 runs in one process
PYTEST_WORKERS ?= 2
# e.g. --rehearse-on-cpu (the same steps at CPU size), --only bench train, --budget-s 540
GPU_CHECK_ARGS ?=
# e.g. --rehearse-on-cpu, --budget-s 300, --rows eager-b8 compiled-b8
GPU_PERF_ARGS ?=
# e.g. --rehearse-on-cpu, --budget-s 480
GPU_INPUT_ARGS ?=
# make venv WHEELS=DIR installs from that folder alone (pip --no-index), e.g. one make wheelhouse WHEELS=DIR filled
WHEELS  ?=
# e.g. --python-version 3.12 (the machine without network's), --torch torch==2.13.0
WHEELHOUSE_ARGS ?=
# make tensorboard: the folder it serves (runs: training scalars under runs/train/*/tb and traces under runs/profile)
LOGDIR  ?= runs
TB_PORT ?= 6006

.PHONY: venv test test-fast test-latest constraints bench bench-compare bench-pytest profile tensorboard gate gate-baseline data train evaluate gpu-check gpu-perf gpu-input docs wheelhouse clean clean-runs

venv: $(STAMP)

# The stamp holds the checksum of what the venv was installed from, so a copied tree (new mtimes, the same files)
# does not reinstall: on a machine without network there is no index to reinstall from.
VENV_INPUTS := $(shell cat pyproject.toml $(CONSTRAINTS) 2>/dev/null | cksum)
ifneq ($(VENV_INPUTS),)
ifeq ($(VENV_INPUTS),$(shell cat $(STAMP) 2>/dev/null))
VENV_CURRENT := 1
endif
endif
# where the venv's pip installs from: WHEELS alone when set (except while make wheelhouse is filling it)
PIP_SOURCE := $(if $(filter wheelhouse,$(MAKECMDGOALS)),,$(if $(WHEELS),--no-index --find-links $(WHEELS)))

ifdef VENV_CURRENT
$(STAMP): ;
else
$(STAMP): pyproject.toml $(CONSTRAINTS)
	@if [ ! -x $(VPY) ]; then \
	  if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	    echo "[venv] reusing the torch importable from $(PYTHON) ($$($(PYTHON) -c 'import torch; print(torch.__version__)'))"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	    parent=$$($(PYTHON) -c "import site, sys; print(*site.getsitepackages(), sep='\n') if sys.prefix != sys.base_prefix else None"); \
	    if [ -n "$$parent" ]; then \
	      echo "[venv] $(PYTHON) is itself a venv (--system-site-packages would not see its packages): linking them in"; \
	      echo "$$parent" > "$$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_parent_env.pth"; \
	    fi; \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@$(VPY) -c "import torch" >/dev/null 2>&1 || { echo "[venv] installing $(TORCH_SPEC)"; \
	  $(VPY) -m pip install -q $(PIP_SOURCE) "$(TORCH_SPEC)" || { \
	  echo "[venv] could not install $(TORCH_SPEC)$(if $(PIP_SOURCE), from $(WHEELS)): set PYTHON to a python that imports torch$(if $(PIP_SOURCE), or put a torch wheel in $(WHEELS) (make wheelhouse WHEELHOUSE_ARGS=--torch=$(TORCH_SPEC)))"; exit 1; }; }
	@$(VPY) -c "import triton" >/dev/null 2>&1 || { echo "[venv] installing $(TRITON_SPEC)"; $(VPY) -m pip install -q $(PIP_SOURCE) "$(TRITON_SPEC)" || echo "[venv] no $(TRITON_SPEC) here: temporal_attn_backend=triton and its tests are unavailable"; }
	@echo "[venv] installing the harness and its dependencies ($(if $(CONSTRAINTS),versions from $(CONSTRAINTS),the newest releases)$(if $(PIP_SOURCE),; wheels from $(WHEELS) only))"
	@$(VPY) -m pip install -q --disable-pip-version-check $(PIP_SOURCE) $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[test]"
	@echo '$(VENV_INPUTS)' > $(STAMP)
endif

test: $(STAMP) data
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(VPY) -m pytest tests -n $(PYTEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)

test-fast: $(STAMP) data
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(VPY) -m pytest tests -m "not slow" -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-latest:
	rm -rf $(LATEST_VENV)
	$(MAKE) test VENV=$(LATEST_VENV) CONSTRAINTS=
	@$(LATEST_VENV)/bin/python -m pip list --format=freeze 2>/dev/null | grep -iE '^(av|kernels|numpy|nvidia-dali-cuda120|omegaconf|torch|transformers)==' | tr '\n' ' '; echo

constraints: test-latest
	@{ echo "# The versions make test installs: the suite was green with them (make constraints, $$(date +%F), Python $$($(LATEST_VENV)/bin/python -c 'import platform; print(platform.python_version())'))."; \
	   echo "# torch and triton are not pinned here: the Makefile installs TORCH_SPEC/TRITON_SPEC or reuses importable ones."; \
	   $(LATEST_VENV)/bin/python -m pip freeze --exclude-editable 2>/dev/null | grep -viE '^(torch|triton|timesformer-harness)(==| @)'; } > constraints.txt
	@echo "constraints.txt rewritten from $(LATEST_VENV): review the diff (git diff constraints.txt) and commit it"

data: $(STAMP)
	$(VPY) -m timesformer_harness.pipelines.tools.toy --out data/toy

bench: $(STAMP) data
	$(VPY) -m timesformer_harness.bench --attn $(ATTN) --mode $(MODE) $(if $(PRESET),--preset $(PRESET)) $(if $(FRAMES),--frames $(FRAMES)) $(if $(IMG),--img $(IMG)) $(if $(SUITES),--suites $(SUITES))

bench-compare: $(STAMP)
	@if [ -z "$(A)" ] || [ -z "$(B)" ]; then echo "usage: make bench-compare A=runs/bench/<run> B=runs/bench/<run>"; exit 2; fi
	$(VPY) -m timesformer_harness.bench compare $(A) $(B)

bench-pytest: $(STAMP)
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(if $(BENCH_PRESET),BENCH_PRESET=$(BENCH_PRESET)) $(VPY) -m pytest benchmarks --benchmark-autosave $(PYTEST_ARGS)

profile: $(STAMP)
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(VPY) -m timesformer_harness.profiling --attn $(if $(filter all,$(ATTN)),divided_space_time,$(ATTN)) $(if $(STEPS),--steps $(STEPS)) $(if $(PRESET),--preset $(PRESET))

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir $(LOGDIR) --host 127.0.0.1 --port $(TB_PORT)

gate: $(STAMP)
	$(VPY) -m timesformer_harness.gate --baseline $(BASELINE) --attn $(ATTN) $(if $(MODE),--mode $(MODE))

gate-baseline: $(STAMP)
	$(VPY) -m timesformer_harness.gate --write-baseline $(BASELINE) --attn $(ATTN) $(if $(PRESET),--preset $(PRESET))

train: $(STAMP) data
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(VPY) -m timesformer_harness.train --config $(CONFIG) $(if $(filter all,$(ATTN)),,model.attention_type=$(ATTN) output.dir=runs/train/$(basename $(notdir $(CONFIG)))_$(ATTN)) $(TRAIN_ARGS)

evaluate: $(STAMP)
	$(VPY) -m timesformer_harness.evaluate --config $(CONFIG) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) $(if $(filter all,$(ATTN)),,model.attention_type=$(ATTN) output.dir=runs/train/$(basename $(notdir $(CONFIG)))_$(ATTN)) $(TRAIN_ARGS)

gpu-check: $(STAMP) data
	$(VPY) -m timesformer_harness.gpu_check $(GPU_CHECK_ARGS)

gpu-perf: $(STAMP)
	$(VPY) -m timesformer_harness.gpu_perf $(GPU_PERF_ARGS)

gpu-input: $(STAMP)
	$(VPY) -m timesformer_harness.benchmarks.gpu_input $(GPU_INPUT_ARGS)

wheelhouse: $(STAMP)
	@if [ -z "$(WHEELS)" ]; then echo "usage: make wheelhouse WHEELS=DIR [WHEELHOUSE_ARGS='--python-version 3.12']"; exit 2; fi
	$(VPY) -m timesformer_harness.wheelhouse --out $(WHEELS) --constraints '$(CONSTRAINTS)' $(WHEELHOUSE_ARGS)

docs: $(STAMP)
	$(VPY) -m timesformer_harness.config_reference

# caches only: runs/ holds checkpoints and measurements, which only clean-runs deletes
clean:
	rm -rf .pytest_cache .benchmarks

clean-runs:
	rm -rf runs
