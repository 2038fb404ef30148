# Two commands on a fresh machine with Python 3.11:
#   make demo   # a finished hyperparameter search on local Ray, MLflow in ./mlflow.db
#   make test   # the test suite (what .ci/run runs)
# Both create .venv when it is missing and install torch + the project into it.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch. On a GPU machine install your CUDA build first
# (make TORCH_SPEC="torch==2.13.0" TORCH_PIP_ARGS="--index-url <your CUDA wheel index>").
# Elsewhere than our machines, the CPU wheel comes from PyTorch's CPU index:
#   make demo TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC     ?= torch==2.13.0
TORCH_PIP_ARGS ?=
DEMO_ARGS      ?=

.PHONY: demo test install browser clean-results

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

install: $(VENV)/.installed

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
