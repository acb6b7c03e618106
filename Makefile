# Every target sets itself up from nothing: venv, pinned dependencies, editable install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The tabular passes are small matrix products: one BLAS thread each avoids
# oversubscribing the two cores these machines have.
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: setup test figures distil table bench bench-llm clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

figures: $(STAMP)
	$(PY) -m theory.figures
	$(PY) -m llm.bridge

# The main LLM job: the CPU testbed distillation of llm/configs/testbed.yaml, ending with its
# test table. Overrides go through ARGS, e.g. make distil ARGS="objective=pbkd online.rounds=2".
distil: $(STAMP)
	$(PY) llm/train.py $(ARGS)

# The five-seed baseline table of the README (figures/llm_methods.{json,md}), from the teacher's
# fine-tune to the last run; resumable (run it again to continue), 1 h 27 min measured on 2 cores.
table: $(STAMP)
	$(PY) -m llm.experiments --methods baselines --teacher-topk 32 max_steps=40 eval.every=20

bench: $(STAMP)
	$(PY) -m pbkd_ref.bench

bench-llm: $(STAMP)
	$(PY) -m llm.bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
