# Two entry points: `make demo` (the main job) and `make test`. Both set up .venv from this repo's files.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test lint bench clean browser lmms-eval-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, alone: pip then takes the local CPU build of 2.13.0 and never a CUDA wheel.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,tensorboard,eval,serve,serve-test,quantize]"
	# DeepSpeed (the [deepspeed] extra) is an sdist: build it against the torch above (no build isolation, which
	# could fetch another torch), without its C++ ops; then JIT-build once the CPU comm op it loads at start (g++).
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation -e ".[deepspeed]"
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/wings demo $(DEMO_ARGS)

# The web page's browser tests drive Debian's Chromium (never `playwright install`, which downloads a browser):
# as root on a machine without it, install it; elsewhere those tests skip and say why.
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium) \
		|| echo "make: could not install chromium; the browser tests will be skipped" >&2; fi

# lmms-eval against `wings serve` (docs/SERVING.md, tests/test_lmms_eval.py) in an environment of its own: its
# declared requirements include torchvision, whose registry wheels are CUDA builds that do not import beside the CPU
# torch, and its `openai` model never imports it; so torch first, lmms-eval without dependencies, then what its
# `openai` model and task loading import (found by running the recipe). Not part of setup: the test skips without it.
LMMS_VENV := .venv-lmms-eval
lmms-eval-venv:
	$(PYTHON) -m venv $(LMMS_VENV)
	$(LMMS_VENV)/bin/pip install -q torch==2.13.0
	$(LMMS_VENV)/bin/pip install -q --no-deps lmms-eval==0.7.3
	$(LMMS_VENV)/bin/pip install -q transformers==5.24.0 accelerate datasets evaluate sacrebleu dill pandas pytz \
		jinja2 loguru pyyaml tenacity tqdm pillow openai python-dotenv pydantic pytablewriter "filelock<4"
	$(LMMS_VENV)/bin/python -c "import lmms_eval.models.simple.openai"

test: $(STAMP) browser
	$(BIN)/pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_train_step.py

clean:
	rm -rf $(VENV) $(LMMS_VENV) build *.egg-info
