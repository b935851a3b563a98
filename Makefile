# fa_lab: two commands do everything on a fresh machine with Python 3.11.
#   make report   run every notebook headless -> reports/ (index.html, pages, figures, data)
#   make test     pytest for the package + nbval for the notebooks (quick mode)
# make curate refreshes the committed figures/ and data/ that the README shows (on purpose).
# Each creates or refreshes .venv and installs what it needs (pip, PyPI only).
# TORCH=0 skips the optional torch==2.13.0 comparison (a large download elsewhere).

comma  := ,
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
TORCH  ?= 1
PY     := $(VENV)/bin/python
EXTRAS_TEST   := test$(if $(filter 1,$(TORCH)),$(comma)torch)
EXTRAS_REPORT := $(if $(filter 1,$(TORCH)),torch)
REPORT_ARGS ?=
PYTEST_ARGS ?=

.PHONY: report test bench curate warmup clean venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# One stamp per extras set: changing pyproject.toml or TORCH reinstalls.
$(VENV)/.installed-report-$(TORCH): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".$(if $(EXTRAS_REPORT),[$(EXTRAS_REPORT)])"
	touch $@

$(VENV)/.installed-test-$(TORCH): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS_TEST)]"
	touch $@

venv: $(VENV)/.installed-test-$(TORCH)

report: $(VENV)/.installed-report-$(TORCH)
	$(PY) -m fa_lab warmup
	$(PY) -m fa_lab report $(REPORT_ARGS)

test: $(VENV)/.installed-test-$(TORCH)
	$(PY) -m fa_lab warmup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed-report-$(TORCH)
	$(PY) -m fa_lab bench --repeats 9 --csv reports/bench_ladder.csv --png reports/bench_ladder.png

# The only command that rewrites the curated results in figures/ and data/ (README).
curate: $(VENV)/.installed-report-$(TORCH)
	$(PY) -m fa_lab warmup
	$(PY) -m fa_lab report --results-dir . $(REPORT_ARGS)
	$(PY) -m fa_lab bench --repeats 9 --csv data/bench_ladder.csv --png figures/bench_ladder.png

clean:
	rm -rf reports .pytest_cache .hypothesis
	find fa_lab -name __pycache__ -prune -exec rm -rf {} +
