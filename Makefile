# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv when missing and
# install what is missing; a second run installs nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# On a machine without an NVIDIA GPU, pin torch to the CPU wheel; with one, pip takes the normal (CUDA) torch.
TORCH_CONSTRAINT := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints-cpu.txt")
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints-cpu.txt | sha1sum | cut -c1-12)

.PHONY: demo test lint install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints-cpu.txt
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_CONSTRAINT) -e '.[train,dev]' 2>&1 \
		| grep -v "is ignored: it is neither a file nor a directory" || true
	$(PY) -c "import torch, transformers, trl, peft, mcp" 2>/dev/null || { echo "install failed"; exit 1; }
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m examples.demo

test: install
	$(PY) -m ruff check --no-cache .
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check --no-cache .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
