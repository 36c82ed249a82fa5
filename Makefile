# Two entry points: `make demo` (the main job) and `make test`. Both build their own environments, pinned by
# constraints.txt (the lock: what CI tested; `make lock` rewrites it from .venv). `make test-latest` is the
# opposite check: the newest release of every upstream package, unpinned, against the remote-code tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONSTRAINTS := constraints.txt
PIP := -m pip install --quiet
SITE = $(shell $(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# Side environments for loading checkpoints where movekd_hf is NOT importable: they see the main
# environment's packages through a .pth path line (so the editable movekd_hf finder there does not run) and
# add only the transformers release under test (plus whatever huggingface_hub/tokenizers it needs; pip never
# pulls torch: transformers does not require it). The matrix itself is REMOTE_MATRIX in
# tests/_model_fixtures.py; tests/test_matrix.py checks that these versions agree with it.
REMOTE_VENV := .venv-remote
TF4_VENV := .venv-tf4
TF4_VERSION := 4.57.6
TF5_OLDEST_VENV := .venv-tf5-oldest
TF5_OLDEST_VERSION := 5.0.0
TF_LATEST_VENV := .venv-tf-latest
# `make test-latest`: newest releases of every upstream package (torch stays as installed in .venv).
LATEST_VENV := .venv-latest
LATEST_PACKAGES := transformers accelerate datasets peft timm huggingface_hub tokenizers safetensors pillow pyyaml tqdm
LATEST_TESTS = tests/test_remote_code.py $(wildcard tests/test_old_checkpoints.py)
LATEST_INSTALL_TIMEOUT := 900
# lmms-eval with the `--model movekd` plugin (tests/test_lmms_eval_plugin.py): lmms-eval pinned here, its
# dependencies held at the lock except two this venv gets its own of: protobuf (lmms-eval 0.7.3 pins wandb 0.25.0,
# which wants protobuf < 7; the lock has 7) and filelock (its evaluator imports `filelock._api`, gone in filelock 4;
# the lock has 4). movekd_hf goes in editable, without dependencies (the main environment's serve): its
# `lmms_eval.models` entry point is what lmms-eval discovers. 3 to 6 minutes on 2 cores, 0.8 GB.
LMMS_VENV := .venv-lmms
LMMS_EVAL_VERSION := 0.7.3
LMMS_OWN_PINS := protobuf|filelock
LMMS_OWN_REQUIREMENTS := "filelock<4"
SIDE_VENVS := $(REMOTE_VENV) $(TF4_VENV) $(TF5_OLDEST_VENV) $(TF_LATEST_VENV) $(LMMS_VENV)

.PHONY: demo test test-latest lock quality format envs clean

# A side venv whose site-packages reads the main environment's through a path line.
define side_venv
	rm -rf $(1)
	$(PYTHON) -m venv $(2) $(1)
	echo "$(SITE)" > "$$($(1)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/main_env.pth"
endef

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) $(PIP) --upgrade pip -c $(CONSTRAINTS)
	# DeepSpeed's setup imports torch: build it against the installed torch (no isolated build env pulling a
	# second torch), without compiling ops (they build on first use, cached in TORCH_EXTENSIONS_DIR).
	$(PY) $(PIP) torch torchvision -c $(CONSTRAINTS)
	DS_BUILD_OPS=0 $(PY) $(PIP) --no-build-isolation 'deepspeed>=0.16' -c $(CONSTRAINTS)
	$(PY) $(PIP) -e '.[dev]' -c $(CONSTRAINTS)
	touch $@

# The locked transformers: no transformers of its own, it sees the main environment's.
$(REMOTE_VENV)/.installed: $(VENV)/.installed
	$(call side_venv,$(REMOTE_VENV),--without-pip)
	touch $@

$(TF4_VENV)/.installed: $(VENV)/.installed
	$(call side_venv,$(TF4_VENV),)
	$(TF4_VENV)/bin/python $(PIP) "transformers==$(TF4_VERSION)"
	touch $@

# The oldest 5.x that pyproject.toml allows (transformers>=5.0).
$(TF5_OLDEST_VENV)/.installed: $(VENV)/.installed
	$(call side_venv,$(TF5_OLDEST_VENV),)
	$(TF5_OLDEST_VENV)/bin/python $(PIP) "transformers==$(TF5_OLDEST_VERSION)"
	touch $@

# The newest transformers on the registry when this is built, unpinned (nothing installed when the locked
# one is the newest: the tests then leave this cell out as a copy of the locked one).
$(TF_LATEST_VENV)/.installed: $(VENV)/.installed
	$(call side_venv,$(TF_LATEST_VENV),)
	$(TF_LATEST_VENV)/bin/python $(PIP) --upgrade transformers
	touch $@

$(LMMS_VENV)/.installed: $(VENV)/.installed
	$(call side_venv,$(LMMS_VENV),)
	grep -v -i -E '^($(LMMS_OWN_PINS))==' $(CONSTRAINTS) > $(LMMS_VENV)/constraints.txt
	$(LMMS_VENV)/bin/python $(PIP) "lmms-eval==$(LMMS_EVAL_VERSION)" $(LMMS_OWN_REQUIREMENTS) -c $(LMMS_VENV)/constraints.txt
	$(LMMS_VENV)/bin/python $(PIP) --no-deps --no-build-isolation -e .
	touch $@

envs: $(VENV)/.installed $(addsuffix /.installed,$(SIDE_VENVS))

demo: $(VENV)/.installed
	$(VENV)/bin/movekd-hf demo --out runs/demo

test: envs
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q tests

# Rewrite the lock from what .venv holds now (e.g. after `.venv/bin/pip install --upgrade transformers`).
# tools/upstream.py leaves out movekd_hf itself and torch's Linux-only CUDA wheels (nvidia-*, cuda-*, triton),
# which torch pins itself. .venv then counts as built from the new lock.
lock:
	@test -x $(PY) || { echo "no $(VENV): run make envs first"; exit 1; }
	$(PY) -m pip freeze --all --exclude-editable | $(PY) tools/upstream.py lock \
	    --header "made on Python $$($(PY) -c 'import platform; print(platform.python_version(), platform.system(), platform.machine())')" \
	    > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	touch $(VENV)/.installed

# Newest releases, unpinned, in a side venv over the main one (torch and its CUDA wheels held at .venv's); then
# the remote-code (and old-checkpoint) tests, and a report of what moved and what failed.
test-latest: envs
	rm -f $(TF_LATEST_VENV)/.installed && $(MAKE) --no-print-directory $(TF_LATEST_VENV)/.installed  # newest now
	$(call side_venv,$(LATEST_VENV),)
	$(PY) -m pip freeze --all | grep -i -E '^(torch|torchvision|triton|nvidia-[^=]*|cuda-[^=]*)==' > $(LATEST_VENV)/keep.txt
	$(LATEST_VENV)/bin/python $(PIP) --upgrade pip
	timeout $(LATEST_INSTALL_TIMEOUT) $(LATEST_VENV)/bin/python $(PIP) --upgrade --upgrade-strategy eager \
	    -c $(LATEST_VENV)/keep.txt $(LATEST_PACKAGES)
	echo "$(CURDIR)" > "$$($(LATEST_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/movekd_hf_source.pth"
	$(LATEST_VENV)/bin/python -m pip freeze --all --exclude-editable > $(LATEST_VENV)/freeze.txt
	HF_HUB_OFFLINE=1 $(LATEST_VENV)/bin/python -m pytest -q -p no:cacheprovider --junitxml=$(LATEST_VENV)/junit.xml \
	    $(LATEST_TESTS); status=$$?; \
	$(PY) tools/upstream.py report --constraints $(CONSTRAINTS) --freeze $(LATEST_VENV)/freeze.txt \
	    --junit $(LATEST_VENV)/junit.xml; exit $$status

quality: $(VENV)/.installed
	$(VENV)/bin/ruff check movekd_hf tests benchmarks tools
	$(VENV)/bin/ruff format --check movekd_hf tests benchmarks tools

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix movekd_hf tests benchmarks tools
	$(VENV)/bin/ruff format movekd_hf tests benchmarks tools

clean:
	rm -rf $(VENV) $(SIDE_VENVS) $(LATEST_VENV) runs
