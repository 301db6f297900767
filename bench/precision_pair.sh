#!/usr/bin/env bash
# Precision of the bf16 fast path against our fp32 path on both models, as the issue-4 runs report it:
# `bench/precision_pair.sh RESULTS_DIR BASE_MODEL [ATTENTION [FUSIONS]]` (FUSIONS: comma-separated, the
# default set if absent; tiny: the golden cases; base: 700 mix
# cases, written to RESULTS_DIR for the run and removed afterwards: they are dev-set texts).
set -uo pipefail
res=$1
base=$2
attention=${3:-triton}
fusions=${4-}
tag=$attention${4+-${fusions//,/_}}
py=${PYTHON:-python3}
shared=${REX_SHARED:-../shared}
$py - "$shared" "$res/mix_cases.jsonl" <<'PY'
import json, sys
from rex_stream.bench.workloads import load_workload
with open(sys.argv[2], "w") as f:
    for i, (t, s) in enumerate(load_workload("mix", sys.argv[1], 700)):
        f.write(json.dumps({"id": str(i), "text": t, "schema": s}, ensure_ascii=False) + "\n")
PY
for spec in "tiny:$shared/rex/golden/public.jsonl:$shared/rex/tiny-random" "base:$res/mix_cases.jsonl:$base"; do
    IFS=: read -r name cases model <<<"$spec"
    timeout 90 $py -m rex_stream.bench.precision --model "$model" --cases "$cases" --device cuda --dtype bf16 \
        --attention "$attention" ${4+--fusions "$fusions"} --out "$res/precision-$name-bf16-$tag.json" \
        | grep -E '"(attention|logit_max_abs_error|identical_share|flip_max_abs_fp32_logit|flips_within_error|fusions)"'
done
rm -f "$res/mix_cases.jsonl"
