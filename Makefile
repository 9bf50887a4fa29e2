# difflab: `make demo` and `make test` are the two commands a new user needs.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# tests/test_interop.py checks difflab's rebuild of denoising-diffusion-pytorch's Unet against the library itself.
# --no-deps: the library requires torchvision (whose wheel replaces this torch) and accelerate; its Unet needs
# neither (the test stands in for them), only einops and ema-pytorch, pinned here with it.
DDPM_PYTORCH_SPEC ?= denoising-diffusion-pytorch==2.3.4 ema-pytorch==0.8.3 einops==0.8.2

.PHONY: test test-slow lint demo venv clean

# The venv is rebuilt only when the project's declared dependencies change.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps $(DDPM_PYTORCH_SPEC)
	touch $(STAMP)

venv: $(STAMP)

# lint and types over src/ (config in pyproject.toml), then the test suite
test: lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src
	$(BIN)/mypy

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

demo: $(STAMP)
	$(BIN)/difflab demo

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
