# Two entry points for a fresh machine (see README.md): `make demo` and `make test`.
# Both create .venv/ and install the pinned requirements on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TRACKING_STAMP := $(VENV)/.installed-tracking

.PHONY: demo model test test-all clean gpu-wheels

$(STAMP): requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -r requirements.txt
	touch $(STAMP)

# The optional experiment-tracking extra (mlflow), which the test suite exercises.
$(TRACKING_STAMP): $(STAMP) requirements-tracking.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -r requirements.txt -r requirements-tracking.txt
	touch $(TRACKING_STAMP)

demo: $(STAMP)
	$(PY) -m monai.bundle run --config_file configs/pretrain.json

# The segmentation weights configs/inference.json serves (and the zoo archive carries): configs/train.json on the
# embedded data, from scratch (MODEL_ARGS="--pretrained_encoder models/encoder_r50.pt" starts from an encoder).
model: models/model.pt

models/model.pt: | $(STAMP)
	$(PY) -m monai.bundle run --config_file configs/train.json --resume False $(MODEL_ARGS)

test: $(TRACKING_STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(TRACKING_STAMP)
	$(PY) -m pytest -q

# The wheels benchmarks/gpu_check.sh installs on a lent GPU machine (no network there; see docs/performance.md).
gpu-wheels: $(STAMP)
	$(PY) -m benchmarks.gpu_wheels --dest .gpu-wheels

clean:
	rm -rf $(VENV) runs
