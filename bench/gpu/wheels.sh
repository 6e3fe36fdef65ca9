#!/usr/bin/env bash
# The wheels bench/gpu/run.sh carries to the GPU machine (Python 3.12, no registry there): the service's
# dependencies and diffusers (the baseline), at the versions of this project's environment. Into .whl/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d .whl fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 \
    python-dotenv==1.2.4 annotated-types==0.8.0 annotated-doc==0.0.7 typing-inspection==0.4.5 \
    typing_extensions==4.16.0 uvicorn==0.54.0 fastapi_offline==1.7.7 limits==5.8.0 Deprecated==1.3.1 \
    opentelemetry-api==1.45.2 importlib_metadata==10.2.0 diffusers==0.42.1
ls .whl
