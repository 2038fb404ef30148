# Two commands on a fresh machine with Python 3.11:
#   make demo   # a finished hyperparameter search on local Ray, MLflow in ./mlflow.db
#   make test   # the test suite (what .ci/run runs)
# Both create .venv when it is missing and install requirements.lock into it (exact versions and
# hashes of every package, torch's CPU wheel and the dev extra included), then the project.
# `make lock` rewrites requirements.lock from pyproject.toml (see the README, "Updating the lock").

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
UV     := $(VENV)/bin/uv
UV_VERSION ?= 0.13.9
LOCK   := requirements.lock
# torch's CPU index: pyproject.toml's [[tool.uv.index]] "pytorch-cpu" (what `make lock` resolves
# torch from). `make` installs the locked torch wheel with pip's own configuration first (a wheel
# on local disk, as on our machines and CI) and asks this index only when pip finds no such wheel.
# (The project is installed --no-deps: uv would look torch up on that index, not on disk.)
TORCH_INDEX ?= $(shell $(PYTHON) -c "import tomllib; print(next(i['url'] for i in tomllib.load(open('pyproject.toml', 'rb'))['tool']['uv']['index'] if i['name'] == 'pytorch-cpu'))")
# On a GPU machine, put your CUDA build over the locked CPU wheel:
#   make test TORCH_SPEC="torch==2.13.0+cu128" TORCH_PIP_ARGS="--index-url <your CUDA wheel index>"
TORCH_SPEC     ?=
TORCH_PIP_ARGS ?=
# extra arguments of `make lock`, e.g. --upgrade, --upgrade-package numpy, or, where PyTorch's
# index can't be reached but the wheel is on disk: --no-sources --find-links <that folder>
LOCK_ARGS ?=
DEMO_ARGS ?=

.PHONY: demo test install lock browser clean-results

$(VENV)/.installed: $(LOCK) pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "uv==$(UV_VERSION)"
	awk '/^torch==/{t=1} t&&/^[^ ]/&&!/^torch==/{t=0} t&&!/#/' $(LOCK) > $(VENV)/torch.lock
	$(PY) -m pip install -q --no-deps --require-hashes -r $(VENV)/torch.lock 2>/dev/null || { \
	  echo "make: the locked torch wheel is not on local disk: from $(TORCH_INDEX)"; \
	  $(PY) -m pip install -q --no-deps --require-hashes --index-url "$(TORCH_INDEX)" -r $(VENV)/torch.lock; }
	$(UV) pip sync -q -p $(PY) --require-hashes $(LOCK)
	$(UV) pip install -q -p $(PY) --no-deps -e .
	@$(UV) pip check -q -p $(PY) >/dev/null 2>&1 || { \
	  echo "make: WARNING: $(LOCK) misses what pyproject.toml asks for; installing it unlocked (run make lock):"; \
	  $(UV) pip check -p $(PY) || true; \
	  $(UV) pip install -q -p $(PY) --no-sources -e .; }
	$(if $(TORCH_SPEC),$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)")
	@touch $@

install: $(VENV)/.installed

# Resolve pyproject.toml (dependencies and the dev extra) for CPython 3.11 on x86_64 Linux, torch
# from the pytorch-cpu index; keeps the versions already in requirements.lock unless LOCK_ARGS
# asks to upgrade.
lock:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "uv==$(UV_VERSION)"
	$(UV) pip compile -q pyproject.toml --extra dev --generate-hashes \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --custom-compile-command "make lock" --output-file $(LOCK) $(LOCK_ARGS)

demo: $(VENV)/.installed
	$(PY) -m tuner.search --space smoke $(DEMO_ARGS)

# tests/test_mlflow_ui.py drives Debian's chromium headless: installed here when missing (as
# root, else through passwordless sudo); with neither, that test is skipped and says why.
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	  else echo "make: cannot install chromium (not root, no sudo): the browser test is skipped"; \
	       exit 0; fi; \
	  $$SUDO apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	    chromium; }

test: $(VENV)/.installed browser
	$(PY) -m pytest -q

clean-results:
	rm -rf mlflow.db mlartifacts optuna.db ray_results reports
