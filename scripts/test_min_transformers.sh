#!/usr/bin/env bash
# Run the integration tests against the oldest supported transformers (5.17, the GPU image's version)
# in a separate virtual environment: python -m venv, then the model-level tests.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-/tmp/sparse-llm-tf517}
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q torch==2.13.0 "transformers==5.17.0" accelerate triton numpy tqdm matplotlib pytest
pip install -q --no-deps -e .
python -m pytest -q -p no:cacheprovider tests/test_hf_models.py tests/test_compat.py tests/test_api_errors.py \
    tests/test_backends.py tests/test_demo.py
