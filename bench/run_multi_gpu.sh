#!/usr/bin/env bash
# Issue 6's figures on one multi-GPU host in one device call: `bench/run_multi_gpu.sh RESULTS_DIR KAFKA_RUNTIME_TAR_XZ`.
# Same host, same base-size random model, every GPU of the host (N). Scaling is weak scaling: each
# process (or worker) gets the same number of messages at 1 GPU and at N, so fixed start/fill/drain
# costs weigh the same (a fixed total split N ways shortens every process's run by N).
#   scaling:      engine, one process per GPU: ner and mix, 1 process on 1 GPU, then N on N
#   dataparallel: the write-up's strategy, the engine's forward under torch.nn.DataParallel over the
#                 N GPUs (and the same engine on GPU 0 alone, same process)
#   broker:       the stream worker through a real local broker, one worker per GPU in one group
#                 (8 partitions per GPU), with 1 GPU and with N (workers only: the engine's
#                 figures are the scaling step's)
# REX_MG_STEPS picks steps (default: all three); REX_MG_NER / REX_MG_MIX / REX_MG_BROKER are the
# messages per process.
set -uo pipefail
res=$1
runtime=$2
py=${PYTHON:-python3}
base=${REX_BENCH_BASE:-/tmp/rex-random-base}
steps=${REX_MG_STEPS:-scaling dataparallel broker}
n=$(nvidia-smi -L | wc -l)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
bash bench/device_prologue.sh "$res"
if [[ $steps == *scaling* ]]; then
    mp="$py -m rex_stream.bench.multiproc --model $base --batch-tokens 131072 --attention triton --chunk 1000000 --warmup 2048 --gpus $n"
    for p in 1 "$n"; do
        timeout 120 $mp --workload ner --messages $((${REX_MG_NER:-40000} * p)) --procs $p --out "$res/ner-scaling-$p.json" | grep -E '"msgs_s"'
        timeout 120 $mp --workload mix --messages $((${REX_MG_MIX:-3000} * p)) --procs $p --out "$res/mix-scaling-$p.json" | grep -E '"msgs_s"'
    done
fi
if [[ $steps == *dataparallel* ]]; then
    dp="$py -m rex_stream.bench.dataparallel --model $base --gpus $n"
    timeout 120 $dp --workload ner --messages 20000 --out "$res/ner-dataparallel.json" | grep -E "msgs_s|vs_one|active"
    timeout 120 $dp --workload mix --messages 2000 --out "$res/mix-dataparallel.json" | grep -E "msgs_s|vs_one|active"
fi
if [[ $steps == *broker* ]]; then
    mkdir -p /tmp/kafka-rt && tar -xJf "$runtime" -C /tmp/kafka-rt
    export REX_KAFKA_CACHE=/tmp/kafka-rt/kafka-cache REX_KAFKA_JAVA=/tmp/kafka-rt/jre-min/bin/java
    bp="$py -m rex_stream.bench.broker_path --model $base --workload ner --warmup 4000 --workers 1 --no-engine"
    timeout 200 $bp --gpus 1 --partitions 8 --messages ${REX_MG_BROKER:-100000} --out "$res/ner-broker-1gpu.json" | grep -E '"worker_(steady_)?msgs_s"'
    timeout 200 $bp --gpus all --partitions $((8 * n)) --messages $((${REX_MG_BROKER:-100000} * n)) \
        --log "$res/worker-log-$n.jsonl" --out "$res/ner-broker-${n}gpu.json" | grep -E '"worker_(steady_)?msgs_s"'
fi
