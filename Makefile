# The two commands of the README. Each builds .venv from requirements.txt
# on first use (or when the requirements change), then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DOCS_VENV := .venv-docs
DOCS_STAMP := $(DOCS_VENV)/.installed

.PHONY: demo test bench docs

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

# The documentation site, strictly (warnings are errors), in its own virtualenv from docs/requirements.txt.
$(DOCS_STAMP): docs/requirements.txt
	test -x $(DOCS_VENV)/bin/python || $(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/python -m pip install -q --upgrade pip
	$(DOCS_VENV)/bin/python -m pip install -q -r docs/requirements.txt
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	rm -rf docs/_build
	$(DOCS_VENV)/bin/python -m sphinx -W --keep-going -n -b html docs docs/_build/html $(ARGS)
