#!/usr/bin/env bash
# A change A/B on one card, in the product's fastest layout: `bench/run_tree_ab.sh RESULTS_DIR PREV_TREE`,
# PREV_TREE holding an earlier commit's `rex_stream/` (`mkdir P && git archive REV rex_stream | tar -x -C P`).
#   1. golden fp32 cases through the current tree's Triton path (in process and served), and the
#      precision of its bf16 fast path against fp32 (`precision_pair.sh`)
#   2. `multiproc --device-server` (4 host processes for ner/re, 8 for mix), previous and current tree
#      alternating -> RESULTS_DIR/tree_ab.jsonl (one JSON object per run, "tree": prev|cur)
#   3. a kernel profile of the current engine on ner
set -uo pipefail
res=$(realpath -m "$1")
prev=$(realpath "$2")
cur=$PWD
source bench/device_prologue.sh "$res"
timeout 60 $py bench/golden_gpu.py triton | tail -1
timeout 60 $py bench/golden_gpu.py triton served | tail -1
bash bench/precision_pair.sh "$res" "$base" triton
run() {  # tree-dir tag workload messages procs chunk
    (cd "$1" && timeout 100 $py -m rex_stream.bench.multiproc --model "$base" --workload "$3" --messages "$4" \
        --procs "$5" --device-server --chunk "$6" --batch-tokens 131072 --attention triton --warmup 512 \
        --out "$res/run.json" >/dev/null) && $py -c "import json,sys; r=json.load(open(sys.argv[1])); r['tree']=sys.argv[2]; \
print(json.dumps(r, separators=(',', ':')))" "$res/run.json" "$2" | tee -a "$res/tree_ab.jsonl" \
        | $py -c "import json,sys; r=json.loads(sys.stdin.read()); print(r['tree'], r['workload'], \
round(r['rows'][0]['msgs_s'], 1), 'padding', round(r['rows'][0]['padding'], 3))"
}
for pass in ${REX_AB_PASSES:-1 2}; do
    for tree in prev cur; do
        dir=$([[ $tree == prev ]] && echo "$prev" || echo "$cur")
        run "$dir" $tree ner 60000 4 5000
        [[ $pass == 1 ]] && run "$dir" $tree re 20000 4 5000 && run "$dir" $tree mix 4000 8 1024
    done
done
rm -f "$res/run.json"
timeout 60 $py bench/profile_engine.py "$base" ner triton 8192 > "$res/profile-ner-triton.txt" 2>&1
head -4 "$res/profile-ner-triton.txt"
