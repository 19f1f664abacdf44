#!/usr/bin/env bash
# A lent GPU machine's whole check in one call (issue 11; bench/README.md, "Running it on a lent GPU").
#
#   bash bench/gpu_session.sh prepare   # here, once: wheels into .whl/, magnetic_tile's train/good into .data/
#   bash bench/gpu_session.sh run       # there, one call carrying .whl and .data (about 5 minutes with "full": 9)
#
# The device machine cannot reach PyPI, so the wheels travel with the tree: the EfficientNet model code and
# isal for each Python it may have. The 17 MB weights wheel does not fit beside magnetic_tile in the 64 MiB a
# call carries, so PatchCore's fit is timed with random weights (the same work).
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
    set -e
    python3 -m pip download -q --no-deps -d .whl efficientnet-lite-pytorch
    for version in 310 311 312 313 314; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
            --platform manylinux2014_x86_64 -d .whl isal
    done
    data=${SSIMAE_SHARED_DATA:-../shared/data}/magnetic_tile/train/good
    mkdir -p .data/magnetic_tile/train && rm -rf .data/magnetic_tile/train/good && cp -r "$data" .data/magnetic_tile/train/
    du -sh .whl .data
    ;;
run)
    out=${OUT:-bench/results/gpu}
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --find-links .whl --target /tmp/site isal efficientnet-lite-pytorch
    export PYTHONPATH=src:/tmp/site
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/card.txt"
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.txt" | tail -15
    sections=train,infer,predict
    [ "${2:-}" = full ] && sections=step,sample,train,infer,predict,paper
    python3 bench/gpu.py --sections "$sections" 2>&1 | tee "$out/gpu.txt"
    python3 bench/gpu.py --sections patchcore --magnetic-tile .data/magnetic_tile --random-features 2>&1 \
        | tee "$out/patchcore.txt"
    ;;
*)
    echo "usage: bash bench/gpu_session.sh prepare | run [full]" >&2
    exit 2
    ;;
esac
