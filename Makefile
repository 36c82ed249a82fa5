# Two entry points: `make demo` (the main job) and `make test`. Both build their own environments.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SITE = $(shell $(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# Side environments for loading checkpoints where movekd_hf is NOT importable: they see the main
# environment's packages through a .pth path line (so the editable movekd_hf finder there does not run).
REMOTE_VENV := .venv-remote
TF4_VENV := .venv-tf4
TF4_VERSION := 4.57.6

.PHONY: demo test quality format envs clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# DeepSpeed's setup imports torch: build it against the installed torch (no isolated build env pulling a
	# second torch), without compiling ops (they build on first use, cached in TORCH_EXTENSIONS_DIR).
	$(PY) -m pip install --quiet torch torchvision
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --no-build-isolation 'deepspeed>=0.16'
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

$(REMOTE_VENV)/.installed: $(VENV)/.installed
	$(PYTHON) -m venv --without-pip $(REMOTE_VENV)
	echo "$(SITE)" > "$$($(REMOTE_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/main_env.pth"
	touch $@

$(TF4_VENV)/.installed: $(VENV)/.installed
	$(PYTHON) -m venv $(TF4_VENV)
	echo "$(SITE)" > "$$($(TF4_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/main_env.pth"
	$(TF4_VENV)/bin/python -m pip install --quiet "transformers==$(TF4_VERSION)"
	touch $@

envs: $(VENV)/.installed $(REMOTE_VENV)/.installed $(TF4_VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/movekd-hf demo --out runs/demo

test: envs
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q tests

quality: $(VENV)/.installed
	$(VENV)/bin/ruff check movekd_hf tests benchmarks
	$(VENV)/bin/ruff format --check movekd_hf tests benchmarks

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix movekd_hf tests benchmarks
	$(VENV)/bin/ruff format movekd_hf tests benchmarks

clean:
	rm -rf $(VENV) $(REMOTE_VENV) $(TF4_VENV) runs
