#!/usr/bin/env bash
# Runs benchmarks.gpu_check on a bare GPU machine (issue 23): no network, Python 3.12 with its own CUDA build of
# torch and numpy, scipy, numba, onnx, onnxruntime, tensorboard, torch-geometric (benchmarks/gpu_wheels.py's
# GPU_IMAGE), but not the rest of requirements.txt. Prepare here with `make gpu-wheels`, carry .gpu-wheels/ with
# the working tree, then there:
#
#   bash benchmarks/gpu_check.sh [--quick] [--device cuda|cpu] [--budget-s S] [--only PART ...]
#
# It makes a virtualenv on the machine's Python with its site packages visible (so the machine's torch is the
# one used: torch is never installed here), installs the carried wheels with --no-index --no-deps, and runs the
# check, writing gpu_check.json and gpu_check.md under $OUT when set (the device tool's folder), else
# runs/gpu_check. Environment: PYTHON (default python3), GPU_WHEELS (default .gpu-wheels), GPU_VENV (default a
# fresh folder under /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.gpu-wheels}
VENV=${GPU_VENV:-$(mktemp -d /tmp/gpu-check-venv.XXXXXX)}
OUTPUT=${OUT:-runs/gpu_check}

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    echo "gpu_check.sh: no wheels under $WHEELS: run 'make gpu-wheels' on a machine with network and carry the folder" >&2
    exit 2
fi
"$PYTHON" -c 'import torch; print(f"machine torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs {torch.cuda.device_count()}")'
if "$PYTHON" -m venv --system-site-packages "$VENV" 2>/dev/null; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps "${wheels[@]}"
else  # no ensurepip on the image: a venv without pip, filled by the machine's own pip
    "$PYTHON" -m venv --clear --system-site-packages --without-pip "$VENV"
    "$PYTHON" -m pip --python "$VENV/bin/python" install --quiet --disable-pip-version-check --no-index --no-deps \
        "${wheels[@]}"
fi
"$VENV/bin/python" -c 'import torch; print(f"check torch {torch.__version__} from {torch.__file__}")'
exec "$VENV/bin/python" -m benchmarks.gpu_check --output "$OUTPUT" "$@"
