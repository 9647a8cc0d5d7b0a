# Two entry points for a newcomer: `make speedrun-cpu` and `make test`. Both create the virtualenv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a GPU machine use e.g. `make install TORCH="torch==2.13.0 --index-url ..."`.
TORCH ?= torch==2.13.0
EXTRAS ?= dev

.PHONY: install speedrun-cpu test test-slow quality style bench clean

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

speedrun-cpu: install
	$(VENV)/bin/nanochat-hf speedrun --tier cpu --run-dir runs/cpu

test: install
	$(PY) -m pytest -q --durations=15

test-slow: install
	$(PY) -m pytest -q -m slow

quality: install
	$(VENV)/bin/ruff check nanochat_hf tests benchmarks

style: install
	$(VENV)/bin/ruff check --fix nanochat_hf tests benchmarks

bench: install
	$(PY) benchmarks/model_step.py
	$(PY) benchmarks/tokenizer_train.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/eval.py
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/compile.py

clean:
	rm -rf $(VENV) runs build *.egg-info .pytest_cache .ruff_cache
