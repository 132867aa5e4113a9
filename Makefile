# mllm-ref: two commands on a fresh machine.
#   make run   - create .venv, install the project with every extra, run the tour on the bundled model
#   make test  - same environment, then the whole suite (unit and property tests, notebooks, exercises)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export HYPOTHESIS_PROFILE ?= ci

.PHONY: install run test test-fast bench book train clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the project and its extras into $(VENV) (log: $(VENV)/pip.log)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[dev]" \
		> $(VENV)/pip.log 2>&1 || (cat $(VENV)/pip.log; exit 1)
	$(BIN)/python -c "import mllm_ref, numba, torch, hypothesis, jupytext, jupyter_book, matplotlib, transformers" 
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/mllm-ref tour

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-fast: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow"

bench: install
	$(BIN)/mllm-ref bench

book: install
	$(BIN)/jupyter-book build book

train: install
	$(BIN)/python -m kernels_torch.tinyvlm.train --layers 12 --visual-dropout 0.5 --out mllm_ref/tinyvlm/weights

clean:
	rm -rf build book/_build .pytest_cache .hypothesis
