# Two commands on a fresh clone: `make train` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# These exact wheels lie on the dev machines' disk; elsewhere pip fetches them.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=

.PHONY: train test lint bench reproduce docs docs-serve demo clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e .
	@# hydra-optuna-sweeper (dropped: it pins optuna<3) registers the same Hydra config names as our sweeper.
	$(PY) -m pip uninstall -q -y hydra-optuna-sweeper 2>/dev/null || true
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(VENV)/.installed-demo: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[demo]'
	touch $@

$(VENV)/.installed-docs: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[docs]'
	touch $@

train: $(VENV)/.installed
	$(PY) -m fmnist_tl.train $(ARGS)

test: $(VENV)/.installed-dev
	$(PY) -m pytest $(ARGS)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# The notebook, fine-tune and default runs, then docs/results.md from what they wrote (needs the ImageNet weights).
reproduce: $(VENV)/.installed
	$(PY) -m fmnist_tl.reproduce $(ARGS)

# The docs site (mkdocs.yml): --strict, as CI builds it, so a broken link or reference fails.
docs: $(VENV)/.installed-docs
	$(VENV)/bin/mkdocs build --strict

docs-serve: $(VENV)/.installed-docs
	$(VENV)/bin/mkdocs serve

# The web page to try a checkpoint (docs/evaluation.md): make demo CKPT=logs/train/runs/<run>/checkpoints/epoch_004.ckpt
demo: $(VENV)/.installed-demo
	@test -n "$(CKPT)" || { echo "error: CKPT is not set: make demo CKPT=path/to/checkpoint.ckpt" >&2; exit 2; }
	$(PY) -m fmnist_tl.demo --checkpoint "$(CKPT)" $(ARGS)

bench: $(VENV)/.installed
	$(PY) -m bench $(ARGS)

clean:
	rm -rf $(VENV) logs cache site .pytest_cache
