# Two commands do all the set-up on a fresh machine:
#   make test       install into .venv, fetch MNIST, lint, run pytest (includes a quick notebook run)
#   make tutorial   install, fetch MNIST, execute the notebook headless (SPARSITY=0.99 to rerun)
#   make html       make tutorial, then export the executed notebook to docs/ as HTML
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SPARSITY ?= 0.95
# Extra papermill parameters, e.g. PARAMS="-p regrow gradient -p allocation uniform".
PARAMS ?=
EXECUTED := executed/dst_tutorial_s$(SPARSITY).ipynb

.PHONY: install data test lint tutorial html benchmarks clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

data: install
	$(BIN)/python -m dst.core.data data

lint: install
	$(BIN)/ruff check .

test: install data lint
	$(BIN)/python -m pytest

tutorial: install data
	mkdir -p executed
	$(BIN)/papermill dst_tutorial.ipynb $(EXECUTED) -p GLOBAL_SPARSITY $(SPARSITY) $(PARAMS)
	@echo "Executed notebook: $(EXECUTED); plots in plots/<run>/, results in results/"

# The executed full run as one HTML file (figures embedded), committed for a presenter without a working laptop.
html: tutorial
	$(BIN)/jupyter nbconvert --to html $(EXECUTED) --output-dir docs --output dst_tutorial_s$(SPARSITY)

# The optional peers (onnxruntime) come from their own requirements file: the tutorial and tests never need them.
benchmarks: install
	$(BIN)/pip install --quiet -r requirements-benchmarks.txt
	$(BIN)/python -m benchmarks.training_step
	$(BIN)/python -m benchmarks.sparse_inference
	$(BIN)/python -m benchmarks.sparse_training

clean:
	rm -rf executed .pytest_cache .ruff_cache .hypothesis
