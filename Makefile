# kla-tl developer entry points. Each target works on a fresh machine by itself:
#
#   make test    run the test suite (CPU tests everywhere; GPU tests run when a CUDA device is present)
#   make check   run `kla-tl check`: forward + backward vs the float64 reference on the best device
#
# The first use creates $(VENV) and installs torch and this project (editable, with the test extra) into it;
# later runs reuse it. Editing pyproject.toml re-runs the install. `make clean-venv` removes it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
#: Index of the CPU-only torch wheels, used when the machine has no NVIDIA driver (no nvidia-smi). When it cannot
#: be reached, pip still resolves torch from any other index or wheel directory in its configuration, and if that
#: fails too the plain `pip install torch` below runs.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
HAVE_NVIDIA_SMI := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
PYTEST_ARGS ?= -q --run-slow

.PHONY: test check clean-venv

# The install stamp is the venv's file target: it exists only once torch and the project are installed.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if $(BIN)/python -c "import torch" >/dev/null 2>&1; then \
		echo "torch already installed in $(VENV)"; \
	elif [ "$(HAVE_NVIDIA_SMI)" = "yes" ]; then \
		echo "nvidia-smi found: installing the default (CUDA) torch build"; \
		$(PIP) install torch; \
	else \
		echo "no nvidia-smi: installing the CPU build of torch"; \
		$(PIP) install --index-url $(TORCH_CPU_INDEX) torch || $(PIP) install torch; \
	fi
	$(PIP) install -e ".[test]"
	touch $@

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests

check: $(VENV)/.installed
	$(BIN)/kla-tl check

clean-venv:
	rm -rf $(VENV)
