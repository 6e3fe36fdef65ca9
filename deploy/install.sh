#!/bin/sh
# The project's install step, shared by the Dockerfile and tests/test_deploy.py (which runs it in a fresh
# virtual environment). torch comes from the environment (the Dockerfile's torch==2.13.0 layer, or the CPU build in
# the test).
set -eu
cd "${1:-.}"
python -m pip install --no-cache-dir --no-compile ".[serve]"
python -c "import model.engine, service.app; print('celeba-ddpm installed')"
