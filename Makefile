# Two entry points for a fresh machine (see README.md): `make demo` and `make test`.
# Both create .venv/ and install the pinned requirements on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all clean

$(STAMP): requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m monai.bundle run --config_file configs/pretrain.json

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
