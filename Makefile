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
#: CPU-only torch for machines without an NVIDIA driver (no nvidia-smi): the `+cpu` build, from pip's configured
#: indexes and wheel directories or from PyTorch's CPU index. The local-version pin keeps pip from picking a CUDA
#: build (several GB of NVIDIA libraries) when the CPU index cannot be reached; if no such wheel exists anywhere,
#: the plain `pip install torch` below runs.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_CPU_SPEC ?= torch==2.13.0+cpu
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
		$(PIP) install --retries 0 --timeout 15 --extra-index-url $(TORCH_CPU_INDEX) "$(TORCH_CPU_SPEC)" \
			|| $(PIP) install torch; \
	fi
	$(PIP) install -e ".[test]"
	touch $@

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests

check: $(VENV)/.installed
	$(BIN)/kla-tl check

clean-venv:
	rm -rf $(VENV)
