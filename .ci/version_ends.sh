#!/usr/bin/env bash
# Both ends of the declared range: the core subset of the tests (tests/version_ends.txt) in a venv with the
# declared floors or with the newest releases (.ci/floor.txt, .ci/newest.txt).
#   bash .ci/version_ends.sh install floor|newest    build the venv (cached, keyed by the requirements)
#   bash .ci/version_ends.sh test floor|newest       run the subset in it (the floor: TRL in a second phase)
# torch comes from PyPI as a CUDA build (runs on the CPU; only 2.13.0 lies here as a CPU wheel), past the
# machine's pip cap on torch. Venvs live under $HF_SAM_CI_CACHE (default ~/.cache/hf-sam-ci).
set -euo pipefail
action=$1 end=$2
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${HF_SAM_CI_CACHE:-$HOME/.cache/hf-sam-ci}
key=$(cat "$root/.ci/$end.txt" "$root/pyproject.toml" | sha256sum | cut -c1-12)
venv=$cache/$end-$key
# no pip cache: the venvs build beside the pinned install, and each is cached whole
pip_in() { PIP_CONSTRAINT=/dev/null PIP_NO_CACHE_DIR=1 DS_BUILD_OPS=0 "$venv/bin/pip" install -q "$@"; }

if [ "$action" = install ]; then
    if [ -f "$venv/.complete" ]; then
        echo "# $end venv cached: $venv"
        exit 0
    fi
    rm -rf "$venv"
    mkdir -p "$cache"
    python3 -m venv "$venv"
    start=$SECONDS
    pip_in -r "$root/.ci/$end.txt" "$root"
    touch "$venv/.complete"
    echo "# $end venv built in $((SECONDS - start)) s: $venv"
    exit 0
fi

[ -f "$venv/.complete" ] || { echo "no $end venv: run 'bash .ci/version_ends.sh install $end' first" >&2; exit 2; }
cd "$root"
pip_in --no-deps -e "$root"  # this checkout's hf_sam
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
"$venv/bin/python" -c "import torch, transformers, accelerate; print('# $end:', 'torch', torch.__version__,
 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
# the floor's core venv has no trl (its floor needs a newer accelerate): its TRL step comes in a second phase
skip='^#'
[ "$end" = floor ] && skip='^#|test_trl'
mapfile -t subset < <(grep -vE "$skip" tests/version_ends.txt)
# one process (these venvs have no pytest-xdist: the subset is short)
"$venv/bin/python" -m pytest -o addopts=-q -p no:cacheprovider "${subset[@]}"
if [ "$end" = floor ]; then
    # TRL 1.16 needs accelerate >= 1.10.1: the TRL step on the core floors with that accelerate, then the
    # venv goes back to the core floors (marked incomplete meanwhile, so an interruption rebuilds it)
    rm "$venv/.complete"
    pip_in -r .ci/floor-trl.txt
    trl=$(grep -v '^#' tests/version_ends.txt | grep test_trl)
    "$venv/bin/python" -c "import trl; print('# floor with trl', trl.__version__)"  # a skip would prove nothing
    "$venv/bin/python" -m pytest -o addopts=-q -p no:cacheprovider $trl
    "$venv/bin/pip" uninstall -q -y trl
    pip_in "$(grep '^accelerate==' .ci/floor.txt)"
    touch "$venv/.complete"
fi
