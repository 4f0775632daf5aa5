# make demo  : set up, then a quick search on CIFAR-10 (DATA=path for a local copy, no download;
#              RUN=name for a second run beside the first)
# make test  : set up, then the test suite
# make lock  : take the newest releases into constraints.txt (then make test)
VENV   ?= .venv
PYTHON ?= python3
DATA   ?=
SPACE  ?= spaces/quick.yaml
RUN    ?=

.PHONY: setup demo test bench lock clean

setup: $(VENV)/.installed

# constraints.txt: the versions the tests last passed with, so that a release upstream (optuna 5.1
# arrived between two CI runs) changes nothing until `make lock` takes it in and the tests pass.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[test,export,mlflow]"
	touch $@

# The newest releases within pyproject's ranges, in a venv of their own, written to constraints.txt;
# then `make test` installs them and runs the tests with them.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip
	.venv-lock/bin/pip install -q -e ".[test,export,mlflow]"
	{ echo "# Written by 'make lock': the versions 'make setup' installs and the tests ran with."; \
	  .venv-lock/bin/pip freeze --exclude-editable; } > constraints.txt
	rm -rf .venv-lock

demo: setup
	$(VENV)/bin/tune-resnet search --space $(SPACE) $(if $(DATA),--data $(DATA)) $(if $(RUN),--name $(RUN))

test: setup
	$(VENV)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/python bench/train_throughput.py $(if $(DATA),--data $(DATA))

clean:
	rm -rf $(VENV) runs .pytest_cache
