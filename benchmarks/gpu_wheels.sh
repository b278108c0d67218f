#!/usr/bin/env bash
# The wheels the GPU session carries to a stock CUDA image (its own torch, transformers, accelerate; no
# pydantic, datasets or evaluate), run once here in the repo's root before `bash benchmarks/gpu_session.sh`
# is sent with carry [".whl"]. The peer SAM (pytorch-optimizer) and DeepSpeed with every dependency the
# image may lack; pydantic-core is compiled, so it is fetched for the image's Python (3.12 unless told).
#   bash benchmarks/gpu_wheels.sh [python-version]
set -euo pipefail
py=${1:-3.12}
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
pure=(pytorch-optimizer==4.1.0 hjson==3.1.0 py-cpuinfo==9.0.0 pydantic==2.14.4 annotated-types==0.8.0
    typing-inspection==0.4.5 typing-extensions==4.16.0 einops==0.8.2)
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "${pure[@]}"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
    pydantic-core==2.50.5 msgpack==1.2.4 ninja==1.13.2
# DeepSpeed ships an sdist; built without its ops (they build just in time, and SAM uses none)
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
ls .whl
