# The two commands of the README. Each builds .venv from requirements.txt
# on first use (or when the requirements change), then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.cifar --dataset digits --partition dirichlet:0.5 --compare allreduce,cpsgd,adpsgd --seeds 0,1,2 --out results/demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

bench: $(STAMP)
	$(PY) -m experiments.bench --out results/bench.json $(ARGS)
