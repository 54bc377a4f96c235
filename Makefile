# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install batchgen with the pinned versions from constraints.txt.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/batchgen generate --model builtin:tiny --out out/generate-demo \
		--prompt "a lighthouse at dawn" --prompt "a red bicycle" --seed 0 --steps 20 --width 256 --height 256

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

.PHONY: install demo test
