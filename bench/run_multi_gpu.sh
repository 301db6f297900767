#!/usr/bin/env bash
# Issue 6's figures on one multi-GPU host: `bench/run_multi_gpu.sh RESULTS_DIR KAFKA_RUNTIME_TAR_XZ`.
# Same host, same base-size random model, every GPU of the host (N). Scaling is weak scaling: each
# GPU gets the same number of messages at 1 GPU and at N, so fixed start/fill/drain costs weigh the
# same (a fixed total split N ways shortens every process's run by N).
#   scaling:       engine, one process per GPU: ner and mix, 1 process on 1 GPU, then N on N
#   served:        engine in the device-server layout: per GPU one device process fed by 4 host
#                  processes (ner) or 8 (mix), on 1 GPU, then on N
#   dataparallel:  the write-up's strategy, the engine's forward under torch.nn.DataParallel over the
#                  N GPUs (and the same engine on GPU 0 alone, same process)
#   broker:        the stream worker through a real local broker, one worker per GPU in one group
#                  (8 partitions per GPU), with 1 GPU and with N (workers only: the engine's
#                  figures are the scaling step's)
#   broker_served: the same with `--workers-per-gpu 4 --device-server` (16 partitions per GPU)
# REX_MG_STEPS picks steps (default: all); REX_MG_NER / REX_MG_MIX / REX_MG_SERVED_NER /
# REX_MG_SERVED_MIX / REX_MG_BROKER are the messages per GPU.
set -uo pipefail
res=$1
runtime=$2
steps=" ${REX_MG_STEPS:-scaling served dataparallel broker broker_served} "
n=$(nvidia-smi -L | wc -l)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
source bench/device_prologue.sh "$res"
mp="$py -m rex_stream.bench.multiproc --model $base --batch-tokens 131072 --attention triton --warmup 2048"
if [[ $steps == *" scaling "* ]]; then
    for g in 1 "$n"; do
        timeout 120 $mp --chunk 1000000 --gpus $g --procs $g --workload ner --messages $((${REX_MG_NER:-40000} * g)) \
            --out "$res/ner-scaling-$g.json" | grep -E "msg/s"
        timeout 120 $mp --chunk 1000000 --gpus $g --procs $g --workload mix --messages $((${REX_MG_MIX:-3000} * g)) \
            --out "$res/mix-scaling-$g.json" | grep -E "msg/s"
    done
fi
if [[ $steps == *" served "* ]]; then
    for g in 1 "$n"; do
        timeout 150 $mp --chunk 5000 --device-server --gpus $g --procs $((4 * g)) --workload ner \
            --messages $((${REX_MG_SERVED_NER:-200000} * g)) --out "$res/ner-served-$g.json" | grep -E "msg/s"
        timeout 150 $mp --chunk 5000 --device-server --gpus $g --procs $((8 * g)) --workload mix \
            --messages $((${REX_MG_SERVED_MIX:-4000} * g)) --out "$res/mix-served-$g.json" | grep -E "msg/s"
    done
fi
if [[ $steps == *" dataparallel "* ]]; then
    dp="$py -m rex_stream.bench.dataparallel --model $base --gpus $n"
    timeout 120 $dp --workload ner --messages 20000 --out "$res/ner-dataparallel.json" | grep -E "msgs_s|vs_one|active"
    timeout 120 $dp --workload mix --messages 2000 --out "$res/mix-dataparallel.json" | grep -E "msgs_s|vs_one|active"
fi
if [[ $steps == *" broker"* ]]; then
    mkdir -p /tmp/kafka-rt && tar -xJf "$runtime" -C /tmp/kafka-rt
    export REX_KAFKA_CACHE=/tmp/kafka-rt/kafka-cache REX_KAFKA_JAVA=/tmp/kafka-rt/jre-min/bin/java
    bp="$py -m rex_stream.bench.broker_path --model $base --workload ner --warmup 4000 --no-engine"
    per=${REX_MG_BROKER:-100000}
    for layout in broker broker_served; do
        [[ $steps == *" $layout "* ]] || continue
        opts="--workers 1" parts=8
        [[ $layout == broker_served ]] && opts="--workers 4 --device-server" parts=16
        for g in 1 "$n"; do
            gpus=$([[ $g == 1 ]] && echo 1 || echo all)
            timeout 200 $bp $opts --gpus $gpus --partitions $((parts * g)) --messages $((per * g)) \
                --log "$res/$layout-log-$g.jsonl" --out "$res/ner-$layout-${g}gpu.json" | grep -E '"worker_(steady_)?msgs_s"'
        done
    done
fi
