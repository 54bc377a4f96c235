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
# open_clip_torch only for the CLIP BPE vocabulary of single-file checkpoints: without its
# dependencies (torchvision would replace the pinned CPU torch stack).
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps open_clip_torch
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/batchgen run jobs/demo.yaml
	@echo "demo done: images in out/demo/images/, manifest in out/demo/manifest.parquet (summary: out/demo/summary.json)"

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The user guide (docs/, mkdocs.yml) as a static site in out/site/; a broken link or anchor fails it.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d out/site

.PHONY: install demo test docs
