# Quick start targets. Each one installs what it needs into a virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
ENGINE := $(VENV)/bin/engine
DEMO ?= demo

.PHONY: install install-test demo test

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

install: $(PY)
	$(PY) -m pip install --quiet -e .

install-test: $(PY)
	$(PY) -m pip install --quiet -e ".[test]"

## demo: install, make a corpus (real objects on real photos when the Debian data can be fetched, else shapes),
## index it, query it, draw the hits into demo/hits/
demo: install
	$(ENGINE) synth $(DEMO)/corpus $$($(PY) -m engine.demo --world) --seed 0
	$(ENGINE) index $(DEMO)/corpus --index $(DEMO)/index
	$(ENGINE) query --index $(DEMO)/index $$($(PY) -m engine.demo $(DEMO)/corpus) -k 8 --exclude-self --save-vis $(DEMO)/hits
	@echo "open $(DEMO)/hits/contact_sheet.png to see the query and its hits"

## test: install with the test extra and run the whole suite
test: install-test
	$(PY) -m pytest -q
