# make demo  : set up, then a quick search on CIFAR-10 (DATA=path for a local copy, no download;
#              RUN=name for a second run beside the first)
# make test  : set up, then the test suite
VENV   ?= .venv
PYTHON ?= python3
DATA   ?=
SPACE  ?= spaces/quick.yaml
RUN    ?=

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[test,export]"
	touch $@

demo: setup
	$(VENV)/bin/tune-resnet search --space $(SPACE) $(if $(DATA),--data $(DATA)) $(if $(RUN),--name $(RUN))

test: setup
	$(VENV)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/python bench/train_throughput.py $(if $(DATA),--data $(DATA))

clean:
	rm -rf $(VENV) runs .pytest_cache
