#!/usr/bin/env bash
# The one prepared run for a lent GPU, every part under its own time limit so one slow part cannot eat the
# others, each ending with one line that starts OK or FAIL; 8 files under $OUT (or ./gpu_out), the most the
# device tool brings back:
#   versions.txt  precision.txt  precision_measure.txt  sync.txt  bench.txt  profile.txt  fsdp2.txt  deepspeed.txt
# Under 9.5 minutes on one H200 with the image's own torch, transformers and accelerate: the parts' limits add up
# to 565 s (the first H200 run, 2026-12-04, took 438 s with two parts cut at their limits: these are sized
# from it), and a part that reaches its limit is cut and gets a FAIL line.
#
# On a GPU: once, here, `bash benchmarks/gpu_wheels.sh` (the peer and DeepSpeed with what the image lacks),
# then the device tool: command "bash benchmarks/gpu_session.sh", carry [".whl"], timeout_s 590. Record the
# tables in benchmarks/RESULTS.md with the date, the card and the versions (versions.txt).
#
# Dry run: `HF_SAM_GPU_DRY_RUN=1 bash benchmarks/gpu_session.sh` runs every part on the CPU with tiny models
# (same scripts, same files, under 3 minutes); CI runs it, so a script that would crash on a GPU fails here.
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
dry=${HF_SAM_GPU_DRY_RUN:-0}
if [ "$dry" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
        export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

# part NAME LIMIT_S FILE COMMAND...: run it under a time limit into FILE; a part that ends without its
# verdict line (a crash, the time limit) gets a FAIL line saying how it ended
part() {
    local name=$1 limit=$2 file=$out/$3
    shift 3
    local start=$SECONDS
    timeout "$limit" "$@" >"$file" 2>&1
    local rc=$?
    if ! tail -n 1 "$file" | grep -qE '^(OK|FAIL) '; then
        local why="exit status $rc"
        [ "$rc" = 124 ] && why="killed at its ${limit} s limit"
        echo "FAIL $name: ended without a verdict ($why; the output above)" >>"$file"
    fi
    echo "[$((SECONDS - start)) s] $(tail -n 1 "$file")"
}

versions() {
    [ "$dry" = 0 ] && nvidia-smi
    python3 -c "
import importlib.metadata, sys, torch, transformers, accelerate
found = {'python': sys.version.split()[0], 'torch': torch.__version__, 'transformers': transformers.__version__,
         'accelerate': accelerate.__version__}
for name in ('deepspeed', 'pytorch-optimizer', 'peft', 'trl'):
    try:
        found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        found[name] = 'absent'
print('OK versions: ' + ', '.join(f'{k} {v}' for k, v in found.items()))
"
}

export -f versions
export dry
part versions 20 versions.txt bash -c versions
# bf16 and fp16 SAM steps on BERT-base and ViT-base: weights restored, finite
part precision 60 precision.txt python3 benchmarks/gpu_check.py
# what bf16/fp16 autocast does to SAM's perturbation and correction, by model size (synthetic data: no datasets)
part precision_measure 55 precision_measure.txt python3 benchmarks/precision.py --data synthetic \
    --models bert-base vit-base bert-large --train_steps 50
# no host sync inside a SAM step, under CUDA's sync debug mode
part sync 35 sync.txt python3 benchmarks/gpu_sync_check.py
# step time (CUDA events, samples >= 0.25 s), share of the bf16 peak, peak memory: BERT-base, ViT-base, ResNet-50;
# the k=1 rows (every rule, the peer), whose intervals must resolve to +-0.01
# (measured 2026-12-04: a model's setup and warm-up take about 35 s beside its timed rounds)
part bench 180 bench.txt python3 benchmarks/bench_step.py --preset gpu --ks 1 --no_family --time_cap 22 \
    --warmup_cap 8
part profile 45 profile.txt python3 benchmarks/profile_step.py --preset gpu --model bert-base --k 1 --steps 20 \
    --torch_profiler
# FSDP2 through the Trainer against the same run without FSDP (one GPU, torchrun with one process)
part fsdp2 90 fsdp2.txt python3 benchmarks/gpu_fsdp_check.py
# DeepSpeed ZeRO-2 through the Trainer against the same run without DeepSpeed, fp32 and --bf16 (torch_autocast,
# ZeRO-2 and ZeRO-3), one case with accumulation; bf16 parameter storage refused
part deepspeed 80 deepspeed.txt python3 benchmarks/gpu_deepspeed_check.py
python3 benchmarks/session_verdicts.py "$out"
