#!/usr/bin/env bash
# Shared start of the device scripts, sourced: `source bench/device_prologue.sh RESULTS_DIR`. Sets `py`
# (PYTHON, default python3), `shared` (REX_SHARED) and `base` (REX_BENCH_BASE, default
# /tmp/rex-random-base) for the script, exports PYTHONUNBUFFERED=1, makes the base-size random model
# at `base` unless it exists, and records the card, driver, torch/triton versions and host CPU in
# RESULTS_DIR/gpu.txt.
set -uo pipefail
res=$1
py=${PYTHON:-python3}
shared=${REX_SHARED:-../shared}
base=${REX_BENCH_BASE:-/tmp/rex-random-base}
export PYTHONUNBUFFERED=1
mkdir -p "$res"
[[ -f $base/config.json ]] || $py -m rex_stream.cli model random --out "$base" --size base --seed 0 \
    --vocab "$shared/rex/tiny-random/vocab.txt" >/dev/null
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$res/gpu.txt"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$res/gpu.txt"
(lscpu | grep -E "^Model name"; echo "cpus $(nproc)") | tee -a "$res/gpu.txt"
