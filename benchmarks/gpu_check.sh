#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a device machine that can fetch nothing, in two steps:
#
#   bash benchmarks/gpu_check.sh prepare   # here, where pip reaches PyPI: into benchmarks/.data/ (ignored),
#                                          # the wheels the device image lacks and a copy of the HH slice
#   bash benchmarks/gpu_check.sh run       # there, via the device tool with carry ["benchmarks/.data"]:
#                                          # installs the wheels, runs the check under a timeout, results to $OUT
#
# The device image has its own CUDA torch, transformers, lightning, peft and accelerate (KINDS.md), so only
# datasets (+ dill, multiprocess), trl and bitsandbytes travel: never a torch wheel, which would replace
# the machine's CUDA build with ours (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=benchmarks/.data
HH=../shared/data/hh-rlhf/harmless-base-test-1500.jsonl.gz
WHEELS="datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 trl==1.16.0 bitsandbytes==0.50.2"

case "${1:-}" in
prepare)
    mkdir -p "$DATA/whl"
    # The image's python3 is 3.12 on x86-64 (KINDS.md); --no-deps: everything else is already there.
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$DATA/whl" $WHEELS
    if [ -f "$HH" ]; then cp "$HH" "$DATA/"; fi
    du -sh "$DATA"  # the working tree and the carried paths travel within 64 MiB
    ;;
run)
    : "${OUT:?run this on the device machine, where \$OUT is the folder that comes back}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$DATA"/whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
    data_flag=()
    if [ -f "$DATA/harmless-base-test-1500.jsonl.gz" ]; then data_flag=(--data "$DATA/harmless-base-test-1500.jsonl.gz"); fi
    # The check stops itself at --budget-s (420 s); the timeout is a backstop that still leaves results.json.
    set -o pipefail
    timeout 540 python3 benchmarks/gpu_check.py "${data_flag[@]}" --out "$OUT/gpu_check" 2>&1 | tee "$OUT/gpu_check.log"
    ;;
*)
    echo "usage: bash benchmarks/gpu_check.sh prepare|run" >&2
    exit 2
    ;;
esac
