#!/usr/bin/env bash
# The one prepared run for a lent GPU: the bf16/fp16 check, the sync check, the GPU benchmark, the
# profile of one step, the FSDP2 check and the DeepSpeed ZeRO-2 check, each under its own time limit so
# one slow part cannot eat the others; outputs under $OUT.
#
# Needs only torch and transformers there (hf_sam runs from the checkout). The peer comes as a wheel;
# once, here, in the repo's root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl pytorch-optimizer==4.1.0
#   DS_BUILD_OPS=0 python3 -m pip wheel --no-deps -w .whl deepspeed==0.19.8 hjson==3.1.0 py-cpuinfo==9.0.0
# then run it with the device tool: command "bash benchmarks/gpu_session.sh", carry [".whl"],
# timeout_s 560. Record the tables in benchmarks/RESULTS.md with the date, the card and the
# versions (versions.txt).
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
        export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{
    nvidia-smi
    python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
} >"$out/versions.txt" 2>&1
cat "$out/versions.txt"
timeout 90 python3 benchmarks/gpu_check.py 2>&1 | tee "$out/gpu_check.txt"
# no host sync inside a SAM step, under CUDA's sync debug mode
timeout 60 python3 benchmarks/gpu_sync_check.py 2>&1 | tee "$out/gpu_sync_check.txt"
# intervals: 45 s of rounds per model (--time_cap), BERT-base, ViT-base, ResNet-50 in bf16
timeout 230 python3 benchmarks/bench_step.py --preset gpu --json "$out/gpu_results.json" 2>&1 | tee "$out/gpu_bench.txt"
timeout 50 python3 benchmarks/profile_step.py --preset gpu --model bert-base --k 1 --steps 20 --torch_profiler 2>&1 |
    tee "$out/gpu_profile.txt"
# FSDP2 through the Trainer against the same run without FSDP (one GPU, torchrun with one process)
timeout 100 python3 benchmarks/gpu_fsdp_check.py 2>&1 | tee "$out/gpu_fsdp_check.txt"
# DeepSpeed ZeRO-2 through the Trainer against the same run without DeepSpeed (fp32; bf16 must be refused)
timeout 120 python3 benchmarks/gpu_deepspeed_check.py 2>&1 | tee "$out/gpu_deepspeed_check.txt"
